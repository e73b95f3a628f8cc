"""Ctrl-C in every phase of a run with loader workers (issue 21): exit 130, one line
(`stopped by SIGINT`), no traceback, no process left behind.

Each phase is reached deterministically: `DML_CLUSTER_TEST_SIGINT_AT=PHASE` makes the run send
SIGINT, once, where a terminal's Ctrl-C goes (its process group; under `--nproc` the launcher's,
which passes it on to the peers and their workers) when it gets there (`signals.signal_point`):

- `worker-start`: from the first loader worker, before it has set its own handlers (the peer is
  still starting its workers);
- `evaluation`: after the first test batch of the first evaluation;
- `checkpoint`: between the peer files and the manifest of the first checkpoint;
- `epoch-boundary`: inside the loader's resuming of its persistent workers for epoch 2.

The one-process engine meets each phase in a child forked from one interpreter that has already
imported everything (one interpreter start for four runs, each in a process group of its own,
as a shell runs a job). `--nproc 2` meets the epoch boundary, where the tracebacks were seen,
through torch's launcher in tests/test_launcher.py's Ctrl-C test (one launch for both: its
peers run with loader workers and are interrupted there)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import yaml

from .conftest import CLI, REPO, cli_env

PHASES = ("worker-start", "evaluation", "checkpoint", "epoch-boundary")
CONFIG = {
    "run": {"name": "stopped", "out_dir": "runs"},
    # 2 steps an epoch: each phase is a second away
    "data": {"name": "digits", "batch_size": 32, "workers": 2, "train_subset": {"per_class": 7}},
    "cohort": {"size": 2, "model": "small_cnn", "args": {"width": 4}},
    "train": {"epochs": 3},
    "metrics": {"enabled": False},
}


def _run_each_phase(root: str) -> None:
    """In a child process per phase, forked from this interpreter once it has imported the
    CLI and torch: `dml-cluster train` in a process group of its own, output to files. Prints
    {phase: exit status} as JSON."""
    # what a run imports, imported once before the children are forked: the engine, digits
    # (scikit-learn), torch's compiler front end (about 2 s of CPU in each child otherwise)
    import sklearn.datasets  # noqa: F401
    import torch._dynamo  # noqa: F401

    import dml_cluster.launch  # noqa: F401
    from dml_cluster import cli

    children = {}
    for phase in PHASES:
        folder = Path(root, phase)
        folder.mkdir()
        pid = os.fork()
        if pid == 0:  # the child: a job of its own, as a shell starts one
            code = 1
            try:
                os.setpgid(0, 0)
                os.chdir(folder)
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644), fd)
                os.environ["DML_CLUSTER_TEST_SIGINT_AT"] = phase
                sys.argv = ["dml-cluster", "train", str(Path(root, "config.yaml"))]
                cli.main()
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = phase
    codes = {}
    for pid, phase in children.items():
        _, status = os.waitpid(pid, 0)
        codes[phase] = os.waitstatus_to_exitcode(status)
    print(json.dumps(codes))


def _quiet_stop(code: int, stderr: str, stdout: str = "") -> None:
    everything = stdout + stderr
    assert code == 130, everything
    assert "Traceback" not in everything and "Exception ignored" not in everything, everything
    assert "[rank" not in everything, everything
    said = [line for line in stderr.splitlines() if "stopped" in line]
    assert len(said) == 1 and said[0].startswith("dml-cluster: stopped by SIGINT"), stderr


def test_ctrl_c_in_each_phase_of_a_one_process_run_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    code = f"from tests.test_interrupts import _run_each_phase; _run_each_phase({str(tmp_path)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=cli_env(),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    for phase in PHASES:
        folder = tmp_path / phase
        stderr, stdout = (folder / "stderr").read_text(), (folder / "stdout").read_text()
        assert stderr.strip().splitlines() == ["dml-cluster: stopped by SIGINT"], (phase, stderr)
        _quiet_stop(codes[phase], stderr, stdout)
        assert not (folder / "runs" / "stopped" / "summary.json").exists(), phase
    # where each stopped: before any checkpoint, after the first, and mid-save (no manifest)
    saved = {
        p: list((tmp_path / p).glob("runs/stopped/checkpoints/*/manifest.json")) for p in PHASES
    }
    assert [len(saved[p]) for p in PHASES] == [0, 0, 0, 1], saved
