"""bf16 and channels_last cohorts train and stay bitwise equal between the one-process engine
and torchrun (CPU, gloo / zmq); fp16 on the CPU is a one-line config error (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

from .cohort_runs import sets, train_many
from .conftest import assert_same_states

CONFIG = "configs/digits-dml.yaml"
BASE = ("cohort.args.width=8", "train.max_steps=8", "metrics.enabled=false")
RUNS = {  # name: (transport under torchrun, settings)
    "bf16": ("torch", ("run.precision=bf16",)),
    "channels-last": ("zmq", ("run.channels_last=true",)),
}


def _runs(out: Path, launched: bool) -> list[list[str]]:
    return [
        [CONFIG, *sets(*BASE, *items, f"run.out_dir={out}", f"run.name={name}",
                       f"bus.transport={transport if launched else 'local'}")]
        for name, (transport, items) in RUNS.items()
    ]  # fmt: skip


def test_bf16_and_channels_last_match_across_processes(tmp_path: Path) -> None:
    """One process trains both configs, then meets fp16 on the CPU: a one-line config error,
    exit 2, nothing written (the batch stops there, with that status)."""
    one, many = tmp_path / "one", tmp_path / "many"
    fp16 = [CONFIG, *sets("run.precision=fp16", f"run.out_dir={tmp_path / 'fp16'}")]
    done = train_many([*_runs(one, False), fp16], tmp_path / "one.json")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert "config error: run.precision: fp16 needs CUDA" in lines[-1], done.stderr[-3000:]
    assert not (tmp_path / "fp16").exists()
    done = train_many(_runs(many, True), tmp_path / "many.json", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in RUNS:
        assert_same_states(one / name, many / name)
        log = many / name / "peers" / "small_cnn-0.jsonl"
        records = [json.loads(line) for line in log.open()]
        assert records and all(r["device"] == "cpu" for r in records)  # the peer's device
        losses = [r["ce"] for r in records if r["event"] == "train"]
        assert all(loss == loss for loss in losses), losses  # no NaN: it trains
