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
imported everything (tests/forked_runs.py: one interpreter start for these four runs and the
torchvision factory's, each in a process group of its own, as a shell runs a job). `--nproc 2`
meets the epoch boundary, where the tracebacks were seen, through torch's launcher in
tests/test_launcher.py's Ctrl-C test (one launch for both: its peers run with loader workers and
are interrupted there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .forked_runs import PHASES


def _quiet_stop(code: int, stderr: str, stdout: str = "") -> None:
    everything = stdout + stderr
    assert code == 130, everything
    assert "Traceback" not in everything and "Exception ignored" not in everything, everything
    assert "[rank" not in everything, everything
    said = [line for line in stderr.splitlines() if "stopped" in line]
    assert len(said) == 1 and said[0].startswith("dml-cluster: stopped by SIGINT"), stderr


def test_ctrl_c_in_each_phase_of_a_one_process_run_is_one_line(forked_runs: Path) -> None:
    codes = json.loads((forked_runs / "codes.json").read_text())
    for phase in PHASES:
        folder = forked_runs / phase
        stderr, stdout = (folder / "stderr").read_text(), (folder / "stdout").read_text()
        assert stderr.strip().splitlines() == ["dml-cluster: stopped by SIGINT"], (phase, stderr)
        _quiet_stop(codes[phase], stderr, stdout)
        assert not (folder / "runs" / "stopped" / "summary.json").exists(), phase
    # where each stopped: before any checkpoint, after the first, and mid-save (no manifest)
    saved = {
        p: list((forked_runs / p).glob("runs/stopped/checkpoints/*/manifest.json")) for p in PHASES
    }
    assert [len(saved[p]) for p in PHASES] == [0, 0, 0, 1], saved


def test_a_loader_workers_lost_connection_after_a_stop_signal_is_not_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """multiprocessing's resource sharer reports a loader worker's connection lost half-way
    through sys.excepthook from its own thread; after a stop signal (the worker got the same
    Ctrl-C) that is no news and prints nothing; without one, or any other error, it is reported.
    (The race itself is interrupted for real in test_launcher's --nproc Ctrl-C at an epoch
    boundary with two loader workers per peer.)"""
    import threading

    from dml_cluster import signals

    monkeypatch.setattr(signals, "LOST_WORKER_WAIT_S", 0.01)
    monkeypatch.setattr(signals, "_signal_seen", threading.Event())
    reported: list[type[BaseException]] = []
    hook = signals._quiet_about_stopped_workers(lambda kind, value, tb: reported.append(kind))

    def from_a_thread(error: BaseException) -> None:
        worker = threading.Thread(target=hook, args=(type(error), error, None))
        worker.start()
        worker.join()

    from_a_thread(ConnectionResetError(104, "Connection reset by peer"))  # no signal yet
    signals._signal_seen.set()
    from_a_thread(ConnectionResetError(104, "Connection reset by peer"))
    from_a_thread(EOFError())
    from_a_thread(ValueError("a real error"))
    hook(ConnectionResetError, ConnectionResetError(), None)  # the main thread's own: reported
    assert reported == [ConnectionResetError, ValueError, ConnectionResetError]
