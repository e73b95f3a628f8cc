"""Killed peers: real processes under torchrun (--max-restarts) and by hand, both transports.

The reference is the same cohort trained uninterrupted in one process (the multi-process trainer
is bitwise identical to it); a killed and restarted cohort must end with the same weights.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psutil
import pytest

from .cohort_runs import train_many
from .conftest import CHECKPOINTED_EPOCHS, assert_same_states
from .faults_helpers import (
    CONFIG,
    cut_back_to,
    settings,
    start,
    start_peers,
    train,
    wait_for,
    workers,
)

EPOCHS = CHECKPOINTED_EPOCHS  # 88 steps: a kill after step 30 lands mid-run
TIMEOUT_S = 8  # bus.timeout_s of the killed-peer runs (the start-up keeps settings' 20 s)
EXIT_SLACK_S = 5
"""The survivor's exit after its timeout: reaching the next exchange after the kill, then
ending (the cause has gone already: launch.reporting does not wait; no interpreter teardown:
dml_cluster/process_exit.py)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(checkpointed_reference: Path) -> Path:
    """The same cohort uninterrupted in one process (conftest's, shared with other modules)."""
    return checkpointed_reference


@pytest.mark.parametrize("transport", ["zmq", "torch"])
def test_a_peer_killed_mid_run_is_restarted_and_the_cohort_resumes(
    runs: Path, reference: Path, transport: str
) -> None:
    name = f"sigkill-{transport}"
    args = settings(
        runs, name, f"bus.transport={transport}", f"bus.timeout_s={TIMEOUT_S}", epochs=EPOCHS
    )
    launcher = start(*args, "--nproc", "2", "--max-restarts", "1")
    try:
        wait_for(runs / name / "checkpoints" / "step-000000030" / "manifest.json", launcher)
        peers = workers(launcher)
        assert sorted(peers) == [0, 1], "the run ended before the kill"
        killed_at = time.monotonic()
        peers[1].kill()  # SIGKILL
        # The survivor stops when its exchange times out (bus.timeout_s): the launcher's SIGTERM
        # only asks for a stop at an agreed step (checkpoint.on_signal), which a dead peer never
        # reaches. EXIT_SLACK_S covers the process's own exit on a loaded machine.
        peers[0].wait(timeout=TIMEOUT_S + EXIT_SLACK_S)
        assert time.monotonic() - killed_at < TIMEOUT_S + EXIT_SLACK_S
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output
    assert "failed (exitcode: -9) local_rank: 1" in output
    resumes = [line for line in output.splitlines() if line.startswith("resuming at step")]
    assert len(resumes) == 1, output  # one restart, from a checkpoint at or after step 30
    assert int(resumes[0].split()[3]) >= 30
    assert "Traceback" not in output
    assert_same_states(runs / name, reference)


def test_a_peer_killed_while_saving_leaves_a_torn_step_that_is_skipped(
    runs: Path, reference: Path
) -> None:
    """small_cnn-1 dies half-way through writing step 40 (a real SIGKILL, at a fixed point)."""
    name = "torn"
    args = settings(runs, name, "bus.transport=zmq", epochs=EPOCHS)
    fault = "die-saving:small_cnn-1:40"  # tests/fault_injection.py
    proc = train_many([[CONFIG, *args]], runs / "torn.json", 2, max_restarts=1, fault=fault)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "failed (exitcode: -9) local_rank: 1" in proc.stderr
    assert "resuming at step 30 (epoch 2, step 8 of it)" in proc.stdout
    assert not list((runs / name).rglob("*.tmp"))
    assert_same_states(runs / name, reference)


def test_a_one_process_checkpoint_resumes_under_torchrun(runs: Path, reference: Path) -> None:
    """Checkpoints do not depend on the layout: one process -> two processes, same numbers."""
    run_dir = runs / "relayout"
    shutil.copytree(reference, run_dir)
    cut_back_to(run_dir, 50)
    proc = train(*settings(runs, "relayout", "bus.transport=zmq", epochs=EPOCHS), "--nproc", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming at step 50 (epoch 3, step 6 of it)" in proc.stdout
    assert_same_states(run_dir, reference)


@pytest.mark.parametrize("transport", ["zmq", "torch"])
def test_without_torchrun_the_survivor_stops_within_the_bus_timeout(
    runs: Path, transport: str
) -> None:
    """Peers started by hand (as on Kubernetes, one pod each, or on two nodes): kill one, and no
    agent stops the survivor, the bus does, with a one-line error naming the lost peer and the
    retryable exit code 200."""
    name = f"by-hand-{transport}"
    args = settings(runs, name, f"bus.transport={transport}", "bus.timeout_s=4", epochs=EPOCHS)
    survivor, victim = start_peers([args, args])
    try:
        wait_for(runs / name / "checkpoints" / "step-000000010" / "manifest.json", survivor)
        killed_at = time.monotonic()
        psutil.Process(victim.pid).kill()
        _, err = survivor.communicate(timeout=60)
        stopped_after = time.monotonic() - killed_at
    finally:
        for p in (survivor, victim):
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert survivor.returncode == 200, err
    assert stopped_after < 4 + 10  # the timeout, plus teardown on a busy 2-core machine
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # the last word is the one-line error, naming the peer
    assert last.startswith("dml-cluster: ") and "small_cnn-1" in last, err
    if transport == "zmq":
        assert "peer 1 (small_cnn-1, rank 1)" in last and "last step seen" in last, err
