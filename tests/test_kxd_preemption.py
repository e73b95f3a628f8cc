"""SIGTERM preemption at D > 1 behaves as at D = 1 (tests/test_preemption.py): a K = 2, D = 2 MLP
cohort under `--nproc 4` (cohort.shard ddp, then fsdp) gets SIGTERM in one process, replica 1 of
peer mlp-1, once its checkpoint of step 22 exists; every process finishes its step, the cohort
saves a complete checkpoint where it stopped, and the launcher exits 143 with the one line that
names that step, leaving no process behind; the rerun resumes there and ends bitwise as the
uninterrupted run.

Marked slow (three launches of 4 processes per shard, about a minute each on 2 cores: no room
in the suite's budget); `bash scripts/test.sh -m slow` runs it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psutil
import pytest

from .conftest import assert_same_states
from .faults_helpers import complete_steps, lines, settings, start, train, wait_for, workers

PER_EPOCH = 22  # configs/digits-dml.yaml
EPOCHS = 2
KXD = (
    "cohort.model=mlp",
    "cohort.args={}",
    "cohort.replicas=2",
    "checkpoint.every_steps=1000",  # no mid-epoch checkpoints but the preemption's
    "bus.transport=torch",
)
NPROC = ("--nproc", "4")  # K = 2 peers x D = 2 replicas, peer-major: local rank 3 is mlp-1's r1


def _preempted_at(run_dir: Path) -> list[int]:
    """The steps of the `preempted` records in the cohort's log."""
    records = [json.loads(line) for line in (run_dir / "cohort.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["event"] == "preempted"]


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_sigterm_to_one_replica_saves_and_the_rerun_resumes_bitwise(
    tmp_path: Path, shard: str
) -> None:
    cohort = (*KXD, f"cohort.shard={shard}")
    args = settings(tmp_path, "preempted", *cohort, epochs=EPOCHS)
    run_dir = tmp_path / "preempted"

    launcher = start(*args, *NPROC)
    wait_for(run_dir / "checkpoints" / f"step-{PER_EPOCH:09d}" / "manifest.json", launcher)
    peers = workers(launcher)
    assert sorted(peers) == [0, 1, 2, 3], peers
    peers[3].send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=150)
    assert launcher.returncode == 143, output
    assert "Traceback" not in output, output
    gone, alive = psutil.wait_procs(list(peers.values()), timeout=10)
    assert not alive, alive

    (saved,) = _preempted_at(run_dir)
    assert PER_EPOCH < saved < EPOCHS * PER_EPOCH, saved
    assert complete_steps(run_dir)[-1] == saved  # complete: every peer's file in place
    stop = lines(output, "saved a complete checkpoint")
    assert len(stop) == 1, output  # the launcher says it; the peers stop quietly
    assert "the peers stopped on SIGTERM (exit 143)" in stop[0], output
    assert f"at step {saved} " in stop[0], output

    again = train(*args, *NPROC)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    assert f"resuming at step {saved} " in again.stdout, again.stdout

    reference = train(*settings(tmp_path, "reference", *cohort, epochs=EPOCHS), *NPROC)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert_same_states(run_dir, tmp_path / "reference")
