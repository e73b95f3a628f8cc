"""Several `dml-cluster train` runs in one process: the test suite's way to pay the start-up
(imports, torchrun's launcher and rendezvous) once for a batch of configurations.

`python -m tests.cohort_runs SPEC.json` runs every entry of SPEC (a list of argument lists, each
`CONFIG --set KEY=VALUE ...`) through the CLI's own entry point, one after the other, and stops at
the first that fails, with its exit status. Run plainly, each entry is the one-process engine;
started by torchrun, each entry is this process's peer of a cohort (`run_peer`), exactly as
`dml-cluster train` runs under a launcher: a new process group, bus and trainer per entry.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train_many(
    runs: Sequence[Sequence[str]], spec: Path, nproc: int | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Train `runs` (argument lists after `train`) in one process, or under one torchrun launch
    of `nproc` peer processes; stdout and stderr captured as text."""
    spec.write_text(json.dumps([list(r) for r in runs]))
    entry = ["-m", "tests.cohort_runs", str(spec)]
    if nproc is None:
        command = [sys.executable, *entry]
    else:  # the launcher settings of dml_cluster.launch.launch_elastic
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
            "--max-restarts=0", "--monitor-interval=0.2", *entry,
        ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # as launch_elastic sets it
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(spec: str) -> None:
    from dml_cluster.cli import main as cli_main

    for args in json.loads(Path(spec).read_text()):
        sys.argv = ["dml-cluster", "train", *args]
        try:
            cli_main()
        except SystemExit as done:
            if done.code not in (None, 0):
                raise
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1])
