"""Progress output: off a terminal, whole progress lines within an epoch; the run's elapsed
time carried over a resume (RunClock)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from dml_cluster.metrics.progress import RunClock, RunPlan, clock_text

from .faults_helpers import command, env, settings

PROGRESS = re.compile(
    r"progress: epoch (\d+)/2  step (\d+)/22  \(run (\d+)/44\)  \d+ samples/s  "
    r"ce small_cnn-0 \d+\.\d{3} small_cnn-1 \d+\.\d{3}  "
    r"elapsed \d+:\d\d:\d\d  eta (\d+:\d\d:\d\d|\?)"
)
EVAL = re.compile(r"epoch (\d+)/2  step \d+  small_cnn-0 ")


def test_progress_lines_within_an_epoch(tmp_path: Path) -> None:
    """Off a terminal (stdout and stderr in one pipe), a line every 0.02 s: progress lines of
    epoch 1 come before its evaluation line, each a whole line in the documented format, their
    steps rising; the run's clock is recorded. (tests/test_preemption.py checks them under
    --nproc: one process draws, no line split.)"""
    args = settings(tmp_path, "progress", "run.progress_every_s=0.02", epochs=2)
    proc = subprocess.run(
        command(*args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=240,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out
    written = out.splitlines()
    progress = [i for i, line in enumerate(written) if line.startswith("progress:")]
    assert len(progress) >= 2, out
    for i in progress:
        assert PROGRESS.fullmatch(written[i]), written[i]
    first_eval = next(i for i, line in enumerate(written) if EVAL.match(line))
    in_epoch_one = [
        int(PROGRESS.fullmatch(written[i]).group(2))
        for i in progress
        if i < first_eval and PROGRESS.fullmatch(written[i]).group(1) == "1"
    ]
    assert in_epoch_one and min(in_epoch_one) < 22, out  # drawn while epoch 1 was running
    runs = [int(PROGRESS.fullmatch(written[i]).group(3)) for i in progress]
    assert runs == sorted(runs), runs
    record = json.loads((tmp_path / "progress" / "clock.json").read_text())
    assert record["step"] == 44 and record["elapsed_seconds"] > 0


def test_the_run_clock_carries_on_over_a_resume(tmp_path: Path) -> None:
    """A resumed attempt continues from the elapsed time the previous one recorded; a missing or
    unreadable record starts from zero; a process without a record path writes nothing."""
    path = tmp_path / "clock.json"
    first = RunClock(path)
    first.before = 3600.0  # as if an hour had been spent already
    first.record(40)
    resumed = RunClock(path)
    resumed.carry_on()
    assert 3600.0 <= resumed.elapsed() < 3660.0
    assert clock_text(resumed.elapsed()).startswith("1:00:")
    path.write_text("{not json")
    broken = RunClock(path)
    broken.carry_on()
    assert broken.elapsed() < 60.0
    silent = RunClock(None)
    silent.carry_on()
    silent.record(1)
    assert path.read_text() == "{not json"
    assert RunPlan(22, 50, 3).steps_in_epoch(2) == 6  # max_steps ends the last epoch early
