"""Preemption with real processes and real signals: a SIGTERM to the `--nproc` launcher, then to
one peer process of the resumed run; each time every peer finishes its step, the cohort saves a
complete checkpoint where it stopped and exits 143; the next run resumes from exactly there and
the cohort ends bitwise as the uninterrupted run. The second run also draws progress lines (one
process draws, every line whole)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from .conftest import assert_same_states
from .faults_helpers import (
    command,
    complete_steps,
    env,
    settings,
    start,
    wait_for,
    workers,
)

PER_EPOCH = 22  # configs/digits-dml.yaml


def _preempted_at(run_dir: Path) -> list[int]:
    """The steps of the `preempted` records in the cohort's log."""
    records = [json.loads(line) for line in (run_dir / "cohort.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["event"] == "preempted"]


def _stop_after_epoch_end(args: list[str], run_dir: Path, after: int, target: str) -> str:
    """Start the cohort (--nproc 2), wait for the first epoch-end checkpoint after step `after`,
    send SIGTERM to the launcher or to peer rank 1; the cohort must exit 143 without a
    traceback, leaving no process behind. Returns its output."""
    epoch_end = (after // PER_EPOCH + 1) * PER_EPOCH
    launcher = start(*args, "--nproc", "2")
    wait_for(run_dir / "checkpoints" / f"step-{epoch_end:09d}" / "manifest.json", launcher)
    peers = workers(launcher)
    (launcher if target == "launcher" else peers[1]).send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=150)
    assert launcher.returncode == 143, output
    assert "Traceback" not in output, output
    gone, alive = psutil.wait_procs(list(peers.values()), timeout=10)
    assert not alive, alive
    return output


def test_sigterm_saves_where_the_cohort_stopped_and_the_next_run_resumes_there(
    tmp_path: Path, checkpointed_reference: Path
) -> None:
    run_dir = tmp_path / "preempted"
    # no mid-epoch checkpoints but the preemption's (epoch ends are saved)
    args = settings(tmp_path, "preempted", "checkpoint.every_steps=1000")
    output = _stop_after_epoch_end(args, run_dir, 0, "launcher")
    assert "stopped by SIGTERM" in output
    (first,) = _preempted_at(run_dir)
    assert PER_EPOCH < first < 4 * PER_EPOCH
    assert f"saved a complete checkpoint at step {first} " in output, output  # named, as in one
    assert complete_steps(run_dir)[-1] == first  # complete, every peer's file in place

    progress = [*args, "--set", "run.progress_every_s=0.01"]  # not in the config hash
    output = _stop_after_epoch_end(progress, run_dir, first, "peer")
    assert f"resuming at step {first} " in output, output
    assert "the peers stopped on SIGTERM" in output, output
    second = _preempted_at(run_dir)[-1]
    assert f"saved a complete checkpoint at step {second} " in output, output
    assert first < second < 4 * PER_EPOCH and complete_steps(run_dir)[-1] == second
    _check_progress_lines(output)

    # the last run in one process: checkpoints do not depend on the layout
    final = subprocess.run(
        command(*args), env=env(), capture_output=True, text=True, timeout=240
    )  # fmt: skip
    assert final.returncode == 0, final.stderr
    assert f"resuming at step {second} " in final.stdout, final.stdout
    assert_same_states(run_dir, checkpointed_reference)
    records = [json.loads(line) for line in (run_dir / "cohort.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_seconds"] for r in records if r["event"] == "eval"]
    assert len(elapsed) == 4 and elapsed == sorted(elapsed), elapsed  # the clock carried on


def _check_progress_lines(output: str) -> None:
    """Under --nproc: progress lines only from the reporting process (their steps strictly
    rise), each whole; no line holds two processes' messages."""
    written = output.splitlines()
    progress = [line for line in written if line.startswith("progress: ")]
    assert progress, output
    steps = [int(m.group(1)) for m in (re.search(r"\(run (\d+)/88\)", p) for p in progress) if m]
    assert len(steps) == len(progress) and steps == sorted(set(steps)), progress
    for line in written:
        assert line.count("dml-cluster:") <= 1 and line.count("progress:") <= 1, line
    inboxes = [line for line in written if "bus inbox" in line]
    assert len(inboxes) == 2 and all(re.search(r"inbox tcp://\S+$", s) for s in inboxes), output


SLOW_SAVE = """
import os, signal, sys, time
from dml_cluster import signals
signals.HARD_STOP_S = 0.5  # what an immediate stop gets; a deferred SIGTERM gets the grace
signals.stop_on_signals()
signals.defer_sigterm(lambda signum: print("asked to stop", flush=True), grace_s=30)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(1.5)  # a checkpoint save slower than the hard stop
print("saved", flush=True)
sys.exit(143)
"""


def test_the_hard_stop_does_not_cut_the_grace_save() -> None:
    """After a deferred SIGTERM, a save that takes longer than HARD_STOP_S runs to its end."""
    proc = subprocess.run(
        [sys.executable, "-c", SLOW_SAVE], env=env(), capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout) == (143, "asked to stop\nsaved\n"), proc.stderr
