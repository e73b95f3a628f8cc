"""`dml-cluster search` end to end on digits, with real processes: a tiny search (rounds of
candidates trained as one cohort with a teacher peer, scored on a validation split of the
training set), its outputs, the winner's retraining, a search killed mid-round that resumes to
the same history, and bad configs."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dml_cluster.config import parse_config
from dml_cluster.errors import ConfigError
from dml_cluster.models import build_model
from dml_cluster.search.report import pareto_figure, write_report
from dml_cluster.search.settings import load_search_config, parse_search_config

from .conftest import CLI, REPO, cli_env, run_cli

ROUNDS, CANDIDATES = 2, 4


def search_config(root: Path, name: str) -> dict[str, Any]:
    """A tiny search: 3 blocks, each a conv or a dwsep (8 architectures, so the 8 candidates
    meet some twice); FLOPs as the cost, so a rerun is bitwise the same."""
    return {
        "run": {"name": name, "out_dir": str(root / "runs")},
        "data": {"name": "digits", "batch_size": 32},
        "method": {"name": "kd", "temperature": 4.0, "kd_weight": 0.5},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1},
        "checkpoint": {"every_steps": 4},
        "search": {
            "teacher": {"model": "small_cnn", "args": {"width": 8},
                        "checkpoint": str(root / "teacher.pt")},
            "rounds": ROUNDS, "candidates": CANDIDATES, "proxy_epochs": 1,
            "space": {"channels": [8, 8, 16], "strides": [1, 2, 2], "stem": 8, "head": 16,
                      "op": ["conv", "dwsep"], "kernel": [3], "expansion": [1], "se": [0.0],
                      "skip": ["identity"], "layers": [1], "width": [1.0]},
            "cost": {"metric": "flops", "target": 0.1, "repeats": 2, "warmup": 0, "batch": 8},
            "retrain": {"epochs": 1, "seeds": [0, 1]},
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the teacher's weights: a small CNN with its initial (untrained) weights;
    the tests check the search's mechanics, not how well this teacher teaches."""
    folder = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    teacher = build_model("small_cnn", (1, 8, 8), 10, width=8)
    torch.save(teacher.state_dict(), folder / "teacher.pt")
    return folder


def write(root: Path, name: str, **search: Any) -> Path:
    cfg = search_config(root, name)
    cfg["search"].update(search)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "search.jsonl").read_text().splitlines()]


def deterministic(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without the measured latency (timing noise; the reward here uses FLOPs)."""
    return [{k: v for k, v in r.items() if k != "latency_ms"} for r in rows]


@pytest.fixture(scope="module")
def finished(root: Path) -> Path:
    """An uninterrupted search with --retrain; its run folder."""
    proc = run_cli("search", str(write(root, "whole")), "--retrain", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "round 2/2" in proc.stdout and "retrained 2 seed(s)" in proc.stdout, proc.stdout
    return root / "runs" / "whole"


def test_a_tiny_search_writes_its_history_report_and_best(finished: Path) -> None:
    rows = records(finished)
    assert [(r["round"], r["index"]) for r in rows] == [
        (r, i) for r in range(ROUNDS) for i in range(CANDIDATES)
    ]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["latency_ms"] > 0
        assert r["mflops"] > 0 and r["params"] > 0 and r["cost"] == r["mflops"]
        assert r["reward"] == pytest.approx(r["accuracy"] * (r["mflops"] / 0.1) ** -0.07)
        assert r["controller"] == "ppo" and r["reward_mode"] == "kd"
    # identical candidates are trained once: one final weight file per distinct architecture
    trained = {p.stem for p in finished.glob("rounds/round-*/final/c*.pt")}
    hashes = {r["hash"] for r in rows}
    assert trained == {f"c{h}" for h in hashes}
    assert sum(not r["cached"] for r in rows) == len(hashes) < len(rows)
    # the candidates' cohort had the teacher peer, trained on the training subset (80% of each
    # class) and was evaluated on the rest of the training set: the test set was never read
    summary = json.loads((finished / "rounds/round-000/summary.json").read_text())
    assert summary["method"] == "kd" and summary["peers"]["teacher"]["role"] == "teacher"
    data = json.loads((finished / "rounds/round-000/data.json").read_text())
    assert data["source"]["options"]["dataset"] == "digits"
    assert abs(data["num_train"] - 0.8 * 1437) < 10 and data["num_train"] + data["num_test"] == 1437
    best_row = max(rows, key=lambda r: r["reward"])
    assert summary["peers"].get(f"c{best_row['hash']}", {}).get("final_accuracy") in (
        None, best_row["accuracy"],
    )  # fmt: skip
    # outputs
    report = (finished / "report.md").read_text()
    assert "| rank | reward | val acc" in report and "## Retrained with KD" in report
    assert (finished / "pareto.png").stat().st_size > 0
    best = max(rows, key=lambda r: r["reward"])
    first = next(line for line in report.splitlines() if line.startswith("| 1 |"))
    assert best["hash"] in first
    retrained = json.loads((finished / "retrain.json").read_text())
    assert retrained["hash"] == best["hash"] and len(retrained["test_accuracy"]) == 2


def test_best_yaml_pastes_into_a_train_config(finished: Path) -> None:
    peer = yaml.safe_load((finished / "best.yaml").read_text())
    cfg = parse_config({"cohort": {"peers": [peer]}, "method": {"name": "independent"}})
    model = build_model(cfg.peers[0].model, (1, 8, 8), 10, **cfg.peers[0].args)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    best = max(records(finished), key=lambda r: r["reward"])
    assert model.arch.hash() == best["hash"]


def test_a_search_killed_mid_round_resumes_to_the_same_history(root: Path, finished: Path) -> None:
    config = write(root, "killed")
    folder = root / "runs" / "killed"
    proc = subprocess.Popen(
        [*CLI, "search", str(config)], cwd=REPO, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    round_two = folder / "rounds" / "round-001"
    deadline = time.monotonic() + 120
    while not list(round_two.glob("checkpoints/step-*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "round 2 never checkpointed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["rounds_done"] == 1  # killed inside round 2, after it had checkpointed
    assert not (round_two / "summary.json").exists()

    again = run_cli("search", str(config), timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming after round 1 of 2" in again.stdout
    assert deterministic(records(folder)) == deterministic(records(finished))
    # the Pareto plot overlays several searches (--compare): one front and legend entry each
    write_report(folder, 3, [finished])
    figure = pareto_figure({"killed": records(folder), "whole": records(finished)}, "mflops")
    assert len(figure.axes[0].get_legend().get_texts()) == 2
    assert (folder / "pareto.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"rounds": 0}, "search.rounds: Input should be greater than or equal to 1"),
        ({"teacher": None}, "search.teacher"),
        ({"controller": {"name": "evolution"}}, "search.controller.name"),
        ({"space": {"channels": [8, 16], "strides": [1]}}, "2 channels but 1 strides"),
        ({"cost": {"metric": "flops"}}, "search.cost.target: required key is missing"),
    ],
)
def test_a_bad_search_section_is_one_config_error(
    root: Path, change: dict[str, Any], words: str
) -> None:
    raw = search_config(root, "bad")
    raw["search"].update(change)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        parse_search_config(raw)


def test_the_rest_of_a_bad_search_config_is_one_config_error(root: Path) -> None:
    raw = search_config(root, "bad")
    for change, words in [
        ({"cohort": {"size": 2, "model": "mlp"}}, "a search builds its cohorts"),
        ({"method": {"name": "kd", "peer_weight": 1.0}}, "must not learn from each other"),
        ({"method": {"name": "dml"}}, "reward kd distils with method kd"),
        ({"optim": {"lr": -1}}, "optim.lr"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_search_config({**raw, **change})


def test_a_bad_config_on_the_command_line_is_one_line_and_exit_2(root: Path) -> None:
    path = write(root, "bad-cli", rounds=0)
    proc = run_cli("search", str(path), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dml-cluster: config error: search.rounds")
    assert not (root / "runs" / "bad-cli").exists()


def test_the_shipped_search_configs_are_valid() -> None:
    paths = sorted((REPO / "configs" / "search").glob("*.yaml"))
    assert paths
    for path in paths:
        assert load_search_config(path).search.rounds >= 1
