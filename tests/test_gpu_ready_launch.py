"""fp16 on the CPU is a one-line config error (exit 2), nothing written. (bf16 and channels_last
cohorts, bitwise equal between the one-process engine and torchrun, train in
tests/test_multiprocess.py's launches.)"""

from __future__ import annotations

from pathlib import Path

from .cohort_runs import sets
from .conftest import run_cli

CONFIG = "configs/digits-dml.yaml"


def test_fp16_on_the_cpu_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    proc = run_cli("train", CONFIG, *sets("run.precision=fp16", f"run.out_dir={tmp_path / 'fp16'}"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "config error: run.precision: fp16 needs CUDA" in lines[0], lines
    assert not (tmp_path / "fp16").exists()
