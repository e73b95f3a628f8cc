"""The one-process engine, end to end through the CLI, on the embedded digits data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dml_cluster.runlog import read_jsonl

from .conftest import final_weights, max_weight_diff, run_cli


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_quick_start_two_peer_dml_reaches_90_percent(out_dir: Path) -> None:
    proc = run_cli("train", "configs/digits-dml.yaml", "--set", f"run.out_dir={out_dir}")
    assert proc.returncode == 0, proc.stderr
    run_dir = out_dir / "digits-dml"
    summary = _summary(run_dir)
    assert summary["cohort_size"] == 2 and summary["epochs"] == 10
    for name, peer in summary["peers"].items():
        assert peer["final_accuracy"] >= 0.90, (name, peer)
        assert len(peer["per_class"]) == 10
    assert summary["ensemble"]["final_accuracy"] >= 0.90
    # one progress line per epoch, then the per-class table
    assert proc.stdout.count("epoch ") == 10 and "| **overall** |" in proc.stdout
    evals = read_jsonl(run_dir / "cohort.jsonl")
    assert [e["epoch"] for e in evals] == list(range(1, 11))
    assert set(evals[-1]["pairs"]) == {"small_cnn-0|small_cnn-1", "small_cnn-1|small_cnn-0"}
    for name in summary["peers"]:
        records = read_jsonl(run_dir / "peers" / f"{name}.jsonl")
        assert records and all(r["event"] == "train" for r in records)
        assert (run_dir / "final" / f"{name}.pt").exists()


@pytest.mark.parametrize(
    ("config", "run", "peers", "epochs"),
    [
        ("configs/digits-k3-hetero.yaml", "digits-k3-hetero", {"mlp", "cnn", "resnet8"}, 3),
        ("configs/digits-dml-e.yaml", "digits-dml-e", {f"small_cnn-{i}" for i in range(3)}, 3),
        ("configs/digits-semi.yaml", "digits-semi", {"small_cnn-0", "small_cnn-1"}, 15),
    ],
)
def test_shipped_cohorts_run(
    out_dir: Path, config: str, run: str, peers: set[str], epochs: int
) -> None:
    proc = run_cli(
        "train", config, "--set", f"run.out_dir={out_dir}", "--set", f"train.epochs={epochs}"
    )
    assert proc.returncode == 0, proc.stderr
    summary = _summary(out_dir / run)
    assert set(summary["peers"]) == peers
    for peer in summary["peers"].values():
        assert peer["final_accuracy"] > 0.5  # learning happened (10 classes: chance is 0.1)


def test_runs_are_reproducible_and_update_modes_differ(out_dir: Path) -> None:
    runs = [("a", "simultaneous", 15), ("b", "simultaneous", 15), ("c", "simultaneous", 1),
            ("d", "sequential", 1)]  # fmt: skip
    for name, update, steps in runs:
        proc = run_cli(
            "train", "configs/digits-k3-hetero.yaml", "--set", f"run.out_dir={out_dir}",
            "--set", f"train.max_steps={steps}", "--set", f"run.name={name}",
            "--set", f"cohort.update={update}",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    a, b, c, d = (final_weights(out_dir / n) for n in "abcd")
    assert max_weight_diff(a, b) == 0.0  # same config and seed: the same weights, bit for bit
    # sequential, first step: peer 0 steps first on the others' predictions, as in simultaneous
    # mode; the later peers see peer 0's refreshed predictions and end elsewhere
    assert max_weight_diff({"mlp": c["mlp"]}, {"mlp": d["mlp"]}) == 0.0
    assert max_weight_diff({"cnn": c["cnn"]}, {"cnn": d["cnn"]}) > 0.0


def test_one_peer_cohort_is_plain_training(out_dir: Path) -> None:
    proc = run_cli(
        "train", "configs/digits-dml.yaml", "--set", f"run.out_dir={out_dir}",
        "--set", "cohort.size=1", "--set", "train.epochs=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = _summary(out_dir / "digits-dml")
    assert list(summary["peers"]) == ["small_cnn-0"]
    assert summary["peers"]["small_cnn-0"]["final_accuracy"] > 0.8
