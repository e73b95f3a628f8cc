"""Several `dml-cluster` commands in one process: the test suite's way to pay the start-up
(imports, torchrun's launcher and rendezvous) once for a batch of configurations or cases.

`python -m tests.cohort_runs SPEC.json` runs every entry of SPEC (a list of command lines, each
`train CONFIG --set KEY=VALUE ...`) through the CLI's own entry point, one after the other, and
stops at the first that fails, with its exit status. Run plainly, each entry is the one-process
engine; started by torchrun, each entry is this process's peer of a cohort (`run_peer`), exactly
as `dml-cluster train` runs under a launcher: a new process group, bus and trainer per entry.

`python -m tests.cohort_runs --each SPEC.json` runs every entry whatever the others did and keeps
what a process of its own would leave: its stdout and stderr (file descriptors 1 and 2, so what
C++ writes too), and the exit status `dml-cluster` would exit with (an exception that escapes the
CLI prints its traceback and counts 1, as the interpreter does). For commands that stop at
start-up (bad input): one process start for many cases.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from dml_cluster.process_exit import run_then_end

from .fault_injection import FAULT_ENV, arm_from_environment

REPO = Path(__file__).resolve().parents[1]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train_many(
    runs: Sequence[Sequence[str]],
    spec: Path,
    nproc: int | None = None,
    timeout: float = 600,
    max_restarts: int = 0,
    fault: str | None = None,
) -> subprocess.CompletedProcess:
    """Train `runs` (argument lists after `train`) in one process, or under one torchrun launch
    of `nproc` peer processes (restarted up to `max_restarts` times); stdout and stderr captured
    as text. `fault`: a fault to inject (tests/fault_injection.py)."""
    spec.write_text(json.dumps([["train", *r] for r in runs]))
    for stale in spec.parent.glob(f"{spec.stem}.*.port"):  # ports of an earlier launch
        stale.unlink()
    entry = ["-m", "tests.cohort_runs", str(spec)]
    if nproc is None:
        command = [sys.executable, *entry]
    else:  # the launcher settings of dml_cluster.launch.launch_elastic
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.2", *entry,
        ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # as launch_elastic sets it
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_each(
    runs: Sequence[Sequence[str]], spec: Path, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """`dml-cluster train ARGS` for each ARGS of `runs`, as cli_each does."""
    return cli_each([["train", *r] for r in runs], spec, timeout)


def cli_each(
    commands: Sequence[Sequence[str]], spec: Path, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """Each `dml-cluster COMMAND` in one process, one after the other, whatever the others did:
    for each, the exit status and output its own process would have (see the module's
    docstring)."""
    spec.write_text(json.dumps([list(c) for c in commands]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, "-m", "tests.cohort_runs", "--each", str(spec)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = []
    for i, command in enumerate(commands):
        out, err, code = (_captured(spec, i, part) for part in ("out", "err", "code"))
        results.append(subprocess.CompletedProcess(["dml-cluster", *command], int(code), out, err))
    return results


def _captured(spec: Path, index: int, part: str) -> str:
    return spec.with_name(f"{spec.stem}.{index}.{part}").read_text()


def _cli(command: Sequence[str]) -> int:
    """`dml-cluster COMMAND` in this process; the exit status its process would have."""
    from dml_cluster.cli import main as cli_main

    sys.argv = ["dml-cluster", *command]
    try:
        cli_main()
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _cli_captured(command: Sequence[str], spec: Path, index: int) -> None:
    saved = os.dup(1), os.dup(2)
    name = f"{spec.stem}.{index}"
    with (
        open(spec.with_name(f"{name}.out"), "w") as out,
        open(spec.with_name(f"{name}.err"), "w") as err,
    ):
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            code = _cli(command)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in ((1, saved[0]), (2, saved[1])):
                os.dup2(copy, fd)
                os.close(copy)
    spec.with_name(f"{name}.code").write_text(str(code))


def _own_master_port(spec: Path, index: int, timeout: float = 120) -> None:
    """Under torchrun, give entry `index` a rendezvous port of its own: rank 0 picks a free one
    and writes it beside the spec, the others read it (one node). With one port for every entry,
    a peer that finished an entry early could connect to rank 0's store of the entry before, just
    before it closed, and rank 0's new store then waits for it in vain."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restart: a new port
    path = spec.with_name(f"{spec.stem}.{index}.{attempt}.port")
    if os.environ["RANK"] == "0":
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(_free_port()))
        tmp.replace(path)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"cohort_runs: rank 0 never chose a port for entry {index}")
        time.sleep(0.01)
    os.environ["MASTER_PORT"] = path.read_text()


def main(argv: list[str]) -> None:
    arm_from_environment()
    each = argv[0] == "--each"
    spec = Path(argv[-1])
    for index, command in enumerate(json.loads(spec.read_text())):
        if each:
            _cli_captured(command, spec, index)
            continue
        _own_master_port(spec, index)
        code = _cli(command)
        sys.stdout.flush()
        if code != 0:
            sys.exit(code)


if __name__ == "__main__":
    run_then_end(lambda: main(sys.argv[1:]))  # as `python -m dml_cluster` ends
