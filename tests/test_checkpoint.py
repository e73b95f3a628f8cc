"""Cohort checkpoints in the one-process engine: layout, pruning, exact resume, torn steps.

Every run is a real `dml-cluster train` process (CPU, deterministic, one thread); the reference
is the same run uninterrupted. Multi-process resumes and killed peers are in test_faults.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import CHECKPOINTED_EPOCHS, assert_same_states
from .faults_helpers import (
    complete_steps,
    cut_back_to,
    one_line_error,
    settings,
    snapshot,
    start,
    steps,
    train,
    wait_for,
)

EPOCHS = 4  # 22 steps per epoch: checkpoints at 10, 20, 22, 30, 40, 44, ... 88


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(runs: Path, checkpointed_reference: Path) -> Path:
    """The uninterrupted run, every checkpoint kept (conftest's, trained once per session for
    this module, test_faults.py and test_curve.py: settings(runs, "reference", epochs=EPOCHS))."""
    assert EPOCHS == CHECKPOINTED_EPOCHS
    shutil.copytree(checkpointed_reference, runs / "reference")
    return runs / "reference"


def _summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    for volatile in ("run", "wall_seconds"):
        summary.pop(volatile)
    return summary


def test_every_checkpoint_is_complete_and_verifiable(reference: Path) -> None:
    assert complete_steps(reference) == [10, 20, 22, 30, 40, 44, 50, 60, 66, 70, 80, 88]
    assert steps(reference) == complete_steps(reference)
    folder = reference / "checkpoints" / "step-000000030"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["step"], manifest["epoch"], manifest["step_in_epoch"]) == (30, 1, 8)
    assert manifest["cohort_size"] == 2
    assert sorted(manifest["peers"]) == ["small_cnn-0", "small_cnn-1"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "small_cnn-0.pt",
        "small_cnn-0.pt.sha256",
        "small_cnn-1.pt",
        "small_cnn-1.pt.sha256",
    ]  # fmt: skip: no temporary files left behind
    check = subprocess.run(
        ["sha256sum", "-c", "small_cnn-0.pt.sha256", "small_cnn-1.pt.sha256"],
        cwd=folder, capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    for name, digest in manifest["peers"].items():
        assert (folder / f"{name}.pt.sha256").read_text().split()[0] == digest


def test_only_the_newest_complete_checkpoints_are_kept(runs: Path) -> None:
    proc = train(*settings(runs, "keep2", "checkpoint.keep=2", epochs=2))
    assert proc.returncode == 0, proc.stderr
    assert steps(runs / "keep2") == [40, 44]


def test_resume_after_a_kill_mid_epoch_is_bitwise_exact(runs: Path, reference: Path) -> None:
    name = "killed"
    proc = start(*settings(runs, name, epochs=EPOCHS))
    try:
        wait_for(runs / name / "checkpoints" / "step-000000030" / "manifest.json", proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # resume from step 30 (epoch 2, step 8 of 22) whatever the kill caught after it
    cut_back_to(runs / name, 30)
    resumed = train(*settings(runs, name, epochs=EPOCHS))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 30 (epoch 2, step 8 of it)" in resumed.stdout
    assert_same_states(runs / name, reference)
    assert _summary(runs / name) == _summary(reference)
    assert complete_steps(runs / name) == complete_steps(reference)


def test_a_torn_checkpoint_is_never_loaded(runs: Path, reference: Path) -> None:
    run_dir = runs / "torn"
    shutil.copytree(reference, run_dir)
    cut_back_to(run_dir, 40)
    torn = run_dir / "checkpoints" / "step-000000040"
    (torn / "manifest.json").unlink()  # killed before the cohort confirmed step 40
    data = (torn / "small_cnn-1.pt").read_bytes()
    (torn / "small_cnn-1.pt").unlink()
    (torn / "small_cnn-1.pt.sha256").unlink()
    (torn / ".small_cnn-1.pt.abc123.tmp").write_bytes(data[: len(data) // 2])
    proc = train(*settings(runs, "torn", epochs=EPOCHS))
    assert proc.returncode == 0, proc.stderr
    assert "resuming at step 30 " in proc.stdout
    assert not list(run_dir.rglob("*.tmp"))
    assert_same_states(run_dir, reference)


def test_steps_that_fail_verification_are_skipped_down_to_one_that_loads(
    runs: Path, reference: Path
) -> None:
    """Step 88's small_cnn-0 file is truncated, step 80's digest of small_cnn-1 is empty: a
    warning line for each, naming the file; the run resumes from step 70 and ends bitwise as the
    uninterrupted run, every checkpoint after 70 saved again."""
    run_dir = runs / "fallback"
    shutil.copytree(reference, run_dir)
    cut_back_to(run_dir, 88)  # the final weights and summary go; the checkpoints stay
    truncated = run_dir / "checkpoints" / "step-000000088" / "small_cnn-0.pt"
    truncated.write_bytes(truncated.read_bytes()[:4096])
    emptied = run_dir / "checkpoints" / "step-000000080" / "small_cnn-1.pt.sha256"
    emptied.write_text("")
    proc = train(*settings(runs, "fallback", epochs=EPOCHS))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning: checkpoint step" in line]
    assert len(warnings) == 2, proc.stderr
    assert warnings[0].startswith("dml-cluster: warning: checkpoint step 88 skipped (resuming")
    assert f"{truncated} is corrupt or truncated (4096 bytes" in warnings[0]
    assert warnings[1].startswith("dml-cluster: warning: checkpoint step 80 skipped (resuming")
    assert f"cannot read the digest of {emptied.with_suffix('')}" in warnings[1]
    assert "resuming at step 70 (epoch 4, step 4 of it)" in proc.stdout
    assert_same_states(run_dir, reference)
    assert snapshot(run_dir / "checkpoints") == snapshot(reference / "checkpoints")


def test_a_finished_run_started_again_says_so_and_changes_nothing(
    runs: Path, reference: Path
) -> None:
    run_dir = runs / "finished"
    shutil.copytree(reference, run_dir)
    before = snapshot(run_dir)
    proc = train(*settings(runs, "finished", epochs=EPOCHS))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{run_dir} is a finished run (4 epochs, 88 steps; results:")
    assert len(proc.stdout.splitlines()) == 1, proc.stdout
    assert snapshot(run_dir) == before


def test_resume_never_refuses_a_folder_with_checkpoints(runs: Path, reference: Path) -> None:
    before = snapshot(reference)
    proc = train(*settings(runs, "reference", "checkpoint.resume=never", epochs=EPOCHS))
    assert proc.returncode == 2
    one_line_error(
        proc, "already holds checkpoints (newest: step 88)", "checkpoint.resume is 'never'"
    )
    assert snapshot(reference) == before
