"""The one-process engine, end to end through the CLI, on the embedded digits data.

The quick start runs as its own `dml-cluster train` process; the other runs train one after the
other in one process (tests/cohort_runs.py, the CLI's entry point per run), but for one of the
two runs whose weights must match bit for bit, which trains in a process of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dml_cluster.run_folder import read_jsonl

from .cohort_runs import sets, train_many
from .conftest import assert_same_states, final_weights, max_weight_diff, run_cli


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


SHIPPED = [
    ("configs/digits-k3-hetero.yaml", "digits-k3-hetero", {"mlp", "cnn", "resnet8"}, 3),
    ("configs/digits-dml-e.yaml", "digits-dml-e", {f"small_cnn-{i}" for i in range(3)}, 3),
    ("configs/digits-semi.yaml", "digits-semi", {"small_cnn-0", "small_cnn-1"}, 6),  # 83%, 82%
]
K3 = "configs/digits-k3-hetero.yaml"
# reproducibility: a and b are one config (trained in two processes), c and d differ in the
# update mode only and stop after one step
REPEATED = [("a", "simultaneous", 15), ("b", "simultaneous", 15), ("c", "simultaneous", 1),
            ("d", "sequential", 1)]  # fmt: skip


def _repeated(out_dir: Path, name: str, update: str, steps: int) -> list[str]:
    return [K3, *sets(f"run.out_dir={out_dir}", f"train.max_steps={steps}", f"run.name={name}",
                      f"cohort.update={update}", "metrics.enabled=false")]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped cohorts, the one-peer cohort and the reproducibility runs but b, trained one
    after the other in one process (tests/cohort_runs.py)."""
    out_dir = tmp_path_factory.mktemp("runs")
    batch = [
        *[[config, *sets(f"run.out_dir={out_dir}", f"train.epochs={epochs}",
                         "metrics.enabled=false")] for config, _, _, epochs in SHIPPED],
        *[_repeated(out_dir, *run) for run in REPEATED if run[0] != "b"],
        ["configs/digits-dml.yaml", *sets(f"run.out_dir={out_dir}", "run.name=one-peer",
                                          "cohort.size=1", "train.epochs=2",
                                          "metrics.enabled=false")],
    ]  # fmt: skip
    proc = train_many(batch, out_dir / "batch.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir


@pytest.mark.parametrize(("config", "run", "peers", "epochs"), SHIPPED)
def test_shipped_cohorts_run(
    runs: Path, config: str, run: str, peers: set[str], epochs: int
) -> None:
    summary = _summary(runs / run)
    assert summary["epochs"] == epochs
    assert set(summary["peers"]) == peers
    for peer in summary["peers"].values():
        assert peer["final_accuracy"] > 0.5  # learning happened (10 classes: chance is 0.1)


def test_runs_are_reproducible_and_update_modes_differ(runs: Path) -> None:
    proc = run_cli("train", *_repeated(runs, *REPEATED[1]))  # b: a's config, another process
    assert proc.returncode == 0, proc.stderr
    c, d = (final_weights(runs / n) for n in "cd")
    assert_same_states(runs / "a", runs / "b")  # same config and seed: the same numbers
    # sequential, first step: peer 0 steps first on the others' predictions, as in simultaneous
    # mode; the later peers see peer 0's refreshed predictions and end elsewhere
    assert max_weight_diff({"mlp": c["mlp"]}, {"mlp": d["mlp"]}) == 0.0
    assert max_weight_diff({"cnn": c["cnn"]}, {"cnn": d["cnn"]}) > 0.0


def test_one_peer_cohort_is_plain_training(runs: Path) -> None:
    summary = _summary(runs / "one-peer")
    assert list(summary["peers"]) == ["small_cnn-0"]
    assert summary["peers"]["small_cnn-0"]["final_accuracy"] > 0.8
