"""One run at a time in a run folder (dml_cluster/run_lock.py), with real processes.

A run that holds its folder is paused (SIGSTOP) right after it took its locks; a second run of
that folder, in one process and under `--nproc 2`, must exit 2 with one line naming the holder's
pid and leave every file and folder as it was (names, sizes, mtimes, contents); resumed, the
first run ends bitwise equal to the one-process reference and removes its lock files. A run
killed with SIGKILL leaves its lock files behind, but not its locks: the next run of the folder
runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .cohort_runs import sets
from .conftest import References, assert_same_states
from .faults_helpers import one_line_error, start, train, workers

CONFIG = "configs/digits-dml.yaml"
RUN = ("train.max_steps=25", "metrics.enabled=false")  # as test_multiprocess.CLI_RUN: one reference
IN_USE = "is in use by another run"


def _args(runs: Path, name: str, *extra: str) -> list[str]:
    return sets(*RUN, f"run.out_dir={runs}", f"run.name={name}", *extra)


def _holders(
    run_dir: Path, run: subprocess.Popen | None = None, peers: int = 2, timeout: float = 120
) -> list[int]:
    """The pids written into the peers' lock files, once every one holds its pid."""
    deadline = time.monotonic() + timeout
    while True:
        pids = []
        for index in range(peers):
            try:
                pids.append(json.loads((run_dir / "locks" / f"peer-{index}.lock").read_text()))
            except (OSError, ValueError):
                break
        if len(pids) == peers:
            return [holder["pid"] for holder in pids]
        if run is not None and run.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.returncode}) before it held its locks")
        assert time.monotonic() < deadline, f"no lock held in {run_dir} within {timeout} s"
        time.sleep(0.01)


def _state(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`, the folder too: kind, size, mtime and (files) sha256."""
    state = {}
    for path in [folder, *sorted(folder.rglob("*"))]:
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        state[str(path.relative_to(folder))] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return state


def _refused(proc: subprocess.CompletedProcess, run_dir: Path, holder: int) -> None:
    """Exit 2, no traceback, one line (one process of the cohort reports) naming the holder."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    one_line_error(proc, f"run folder {run_dir} {IN_USE} (pid {holder} on host ")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if IN_USE in line]
    assert len(lines) == 1, lines


def test_a_second_run_of_a_busy_folder_exits_2_and_touches_nothing(
    tmp_path: Path, references: References
) -> None:
    (reference,) = references((CONFIG, *RUN))
    run_dir = tmp_path / "busy"
    first = start(*_args(tmp_path, "busy"))
    try:
        assert _holders(run_dir, run=first) == [first.pid, first.pid]
        os.kill(first.pid, signal.SIGSTOP)  # holds its locks, writes nothing while we look
        before = _state(run_dir)
        one_process = train(*_args(tmp_path, "busy"), timeout=120)
        two_processes = train(*_args(tmp_path, "busy", "bus.transport=zmq"), "--nproc", "2")
        after = _state(run_dir)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output
    _refused(one_process, run_dir, first.pid)
    _refused(two_processes, run_dir, first.pid)
    assert after == before
    assert_same_states(run_dir, reference)
    assert not (run_dir / "locks").exists()  # a run that ends takes its lock files with it


def test_a_killed_runs_lock_does_not_block_the_next_run(
    tmp_path: Path, references: References
) -> None:
    (reference,) = references((CONFIG, *RUN))
    run_dir = tmp_path / "killed"
    launcher = start(*_args(tmp_path, "killed", "bus.transport=zmq"), "--nproc", "2")
    try:
        holders = _holders(run_dir, run=launcher)
        peers = workers(launcher)
        assert sorted(holders) == sorted(p.pid for p in peers.values())
        for peer in peers.values():
            peer.send_signal(signal.SIGKILL)
        launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert _holders(run_dir) == holders  # the dead holders' files are still there
    again = train(*_args(tmp_path, "killed"), timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert IN_USE not in again.stdout + again.stderr
    assert_same_states(run_dir, reference)


def test_a_refused_claim_makes_no_file(tmp_path: Path) -> None:
    """A run holding only peer 1 here (one node's share of a cohort): a run that needs peers 0
    and 1 fails on peer 1's lock (an existing file, tried first) before it makes peer 0's."""
    from dml_cluster.run_lock import RunFolderInUse, RunFolderLock, claim_run_folder

    run_dir = tmp_path / "shared"
    with claim_run_folder(run_dir, {1: "b"}):
        before = _state(run_dir)
        second = RunFolderLock(run_dir, {0: "a", 1: "b"})
        with pytest.raises(RunFolderInUse, match=rf"pid {os.getpid()} on host "):
            second.acquire()
        assert _state(run_dir) == before
    assert not (run_dir / "locks").exists()
