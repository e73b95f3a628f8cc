"""`dml-cluster analyze`: training-set entropy and flatness against hand computation on a tiny
model, and the command on a real run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dml_cluster.analyze import analyze_model, analyze_run, flatness, loss_and_entropy
from dml_cluster.data.seeding import seeded_generator

from .cohort_runs import cli_each

X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
Y = torch.tensor([0, 1, 2, 0])
W = [[0.5, -0.2], [0.1, 0.4], [-0.3, 0.3]]
B = [0.0, 0.1, -0.1]


def tiny() -> nn.Linear:
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W))
        model.bias.copy_(torch.tensor(B))
    return model


def by_hand(weight: list[list[float]], bias: list[float]) -> tuple[float, float, float]:
    """Mean CE, mean entropy and accuracy of a linear softmax classifier, in plain Python."""
    loss = entropy = correct = 0.0
    for x, y in zip(X.tolist(), Y.tolist(), strict=True):
        z = [
            sum(w * v for w, v in zip(row, x, strict=True)) + b
            for row, b in zip(weight, bias, strict=True)
        ]
        top = max(z)
        exps = [math.exp(v - top) for v in z]
        p = [e / sum(exps) for e in exps]
        loss -= math.log(p[y])
        entropy -= sum(q * math.log(q) for q in p)
        correct += z.index(top) == y
    n = len(Y)
    return loss / n, entropy / n, correct / n


def test_loss_entropy_and_accuracy_match_hand_computation() -> None:
    batches = [(X[:3], Y[:3]), (X[3:], Y[3:])]  # batch sizes 3 and 1: weighted by samples
    got = loss_and_entropy(tiny(), batches)
    loss, entropy, acc = by_hand(W, B)
    assert math.isclose(got["loss"], loss, rel_tol=1e-6)
    assert math.isclose(got["entropy"], entropy, rel_tol=1e-6)
    assert got["accuracy"] == acc


def test_flatness_is_the_mean_loss_rise_over_seeded_noise_draws() -> None:
    model, sigmas, draws = tiny(), (0.05, 0.5), 3
    result = flatness(model, [(X, Y)], sigmas, draws, seed=7)
    clean = by_hand(W, B)[0]
    for i, sigma in enumerate(sigmas):
        rises = []
        for d in range(draws):  # the documented draw: weight then bias, from (seed, i, d)
            g = seeded_generator("analyze.flatness", 7, i, d)
            dw = torch.randn((3, 2), generator=g).tolist()
            db = torch.randn((3,), generator=g).tolist()
            noisy_w = [[w + sigma * e for w, e in zip(r, er, strict=True)]
                       for r, er in zip(W, dw, strict=True)]  # fmt: skip
            noisy_b = [b + sigma * e for b, e in zip(B, db, strict=True)]
            rises.append(by_hand(noisy_w, noisy_b)[0] - clean)
        assert math.isclose(result["rise"][f"{sigma:g}"], sum(rises) / draws, rel_tol=1e-5)
    assert torch.equal(model.weight, tiny().weight)  # the weights are restored
    assert result["rise"]["0.5"] > result["rise"]["0.05"]
    full = analyze_model(model, [(X, Y)], sigmas, draws, seed=7)
    assert full["flatness"] == result["rise"] and full["train_accuracy"] == by_hand(W, B)[2]


def test_analyze_command_on_a_run_folder(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "pair", "out_dir": str(tmp_path)},
                "data": {"name": "digits", "train_subset": {"per_class": 10}},
                "cohort": {"size": 2, "model": "mlp", "args": {"hidden": [8]}},
                "train": {"epochs": 1},
                "metrics": {"enabled": False},
                "checkpoint": {"enabled": False},
            }
        )
    )
    run_dir = tmp_path / "pair"
    plot = tmp_path / "fig.png"
    (tmp_path / "elsewhere").mkdir()  # a folder without a run in it
    train, ok, recorded, no_config, bad_sigma = cli_each(
        [
            ["train", str(config)],
            [
                "analyze",
                str(run_dir),
                "--config",
                str(config),
                "--draws",
                "2",
                "--sigma",
                "0.01,0.1",
                "--plot",
                str(plot),
            ],
            ["analyze", str(run_dir), "--draws", "2", "--sigma", "0.01,0.1"],  # its config.yaml
            ["analyze", str(tmp_path / "elsewhere")],
            ["analyze", str(run_dir), "--config", str(config), "--sigma", "0,x"],
        ],  # fmt: skip
        tmp_path / "spec.json",
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert ok.returncode == 0, ok.stderr[-2000:]
    result = json.loads((run_dir / "analysis.json").read_text())
    assert set(result["peers"]) == {"mlp-0", "mlp-1"} and result["sigmas"] == [0.01, 0.1]
    for peer in result["peers"].values():
        assert 0.0 <= peer["train_accuracy"] <= 1.0 and 0.0 < peer["train_entropy"] < math.log(10)
        assert set(peer["flatness"]) == {"0.01", "0.1"}
    assert "| pair | mlp-0 |" in ok.stdout and plot.stat().st_size > 0
    # the run folder records its resolved config: analyze needs no --config, same numbers
    assert recorded.returncode == 0, recorded.stderr[-2000:]
    assert json.loads((run_dir / "analysis.json").read_text()) == result
    for bad, words in ((no_config, "has no config.yaml"), (bad_sigma, "--sigma")):
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_the_runs_memory_layout_gives_the_same_analysis(tmp_path: Path) -> None:
    """A run trained channels_last is analyzed in that layout: same numbers up to rounding."""
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "cnn", "out_dir": str(tmp_path), "channels_last": True},
                "data": {"name": "digits", "batch_size": 25, "train_subset": {"per_class": 5}},
                "cohort": {"size": 1, "model": "small_cnn", "args": {"width": 4}},
                "method": {"name": "independent"},
                "train": {"epochs": 1},
                "metrics": {"enabled": False},
                "checkpoint": {"enabled": False},
            }
        )
    )
    (train,) = cli_each([["train", str(config)]], tmp_path / "spec.json")
    assert train.returncode == 0, train.stderr[-2000:]
    nhwc = analyze_run(tmp_path / "cnn", sigmas=[0.05], draws=2)
    nchw = analyze_run(
        tmp_path / "cnn", sigmas=[0.05], draws=2, overrides=["run.channels_last=false"]
    )
    for a, b in zip(nhwc["peers"].values(), nchw["peers"].values(), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["flatness"]["0.05"] == pytest.approx(b["flatness"]["0.05"], rel=1e-4, abs=1e-6)
