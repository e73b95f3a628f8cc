"""Models that look trained and are not (issue 21, item 7): a peer at chance in evaluation while
high on its training batches gets one warning line naming BatchNorm's running statistics (after
the epoch line, in its log, in `dml-cluster report`), and `dml-cluster analyze` flags results
that cannot be read as flatness. The thresholds against hand computation; a real cohort in
this process, whose BatchNorm momentum is tiny (tests/bn_factories.py), shows it in one epoch."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dml_cluster import analyze, plots
from dml_cluster.analyze import flatness_flags, readable_groups
from dml_cluster.bus.base import BusStats
from dml_cluster.metrics.batch import PeerBatchStats
from dml_cluster.metrics.chance import (
    ChanceWatch,
    batchnorm_facts,
    chance_bound,
    high_accuracy,
)
from dml_cluster.metrics.events import EvalEvent, PeerStep, StepEvent
from dml_cluster.run_folder import JsonlLog

from .conftest import cli_in_process

LAG = "tests.bn_factories:lagging_bn_net"


def test_the_thresholds_are_chance_plus_three_standard_errors_and_halfway_to_perfect() -> None:
    # 10 classes, 360 evaluation samples: 0.1 + 3 * sqrt(0.1 * 0.9 / 360) = 0.1 + 0.0474...
    # float sqrt rounding
    assert math.isclose(chance_bound(10, 360), 0.1 + 3 * math.sqrt(0.09 / 360), rel_tol=1e-12)
    assert math.isclose(chance_bound(2, 100), 0.5 + 3 * 0.05, rel_tol=1e-12)  # float sqrt rounding
    assert high_accuracy(10) == 0.55 and high_accuracy(2) == 0.75


def _cohort_events(watch: ChanceWatch, train: list[float], evals: list[float], step: int) -> None:
    """Peer 0's sampled training accuracies, then an evaluation where peer 0 scores evals[0]
    and peer 1 evals[1]."""
    for k, accuracy in enumerate(train):
        peers = {0: PeerStep(0.1, None, PeerBatchStats(accuracy, 0.5, {}))}
        watch.on_step(StepEvent.of(step=k, epoch=0, batch_size=8, step_seconds=0.0, peers=peers))
    report = {"peers": {"a": {"accuracy": evals[0]}, "b": {"accuracy": evals[1]}}}
    watch.on_eval(EvalEvent(1, step, report, BusStats(), 0.0))


def test_the_watch_warns_once_when_the_later_training_batches_are_high_and_eval_at_chance(
    tmp_path: Path,
) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=0.01), nn.Linear(4, 10))
    out, log = io.StringIO(), JsonlLog(tmp_path / "a.jsonl")
    watch = ChanceWatch(["a", "b"], {0: model}, {0: log}, 10, 360, every=1, out=out)
    bound = chance_bound(10, 360)
    # the earlier half of the batches does not count: low there, high later
    _cohort_events(watch, [0.0, 0.0, 0.6, 0.5], [bound, 0.99], step=4)  # later mean 0.55
    _cohort_events(watch, [1.0, 1.0], [0.1, 0.99], step=8)  # once per peer
    log.close()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("warning: peer a: test accuracy 14.74% is no better than chance ")
    assert "training accuracy is 55.00% after 4 steps: likely BatchNorm's running" in line
    assert "(1 layer, momentum 0.01, 0 updates: they still hold 100% " in line
    (record,) = [json.loads(r) for r in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert record["event"] == "warning" and record["message"] == line and record["step"] == 4
    # just below "high", or just above the bound: no warning
    for train, evaluated in (([0.549] * 2, 0.1), ([1.0] * 2, bound + 1e-6)):
        quiet = io.StringIO()
        watch = ChanceWatch(["a", "b"], {0: model}, {0: log}, 10, 360, every=1, out=quiet)
        _cohort_events(watch, train, [evaluated, 0.99], step=2)
        assert quiet.getvalue() == ""


def test_batchnorm_facts_say_how_much_of_the_initial_statistics_is_left() -> None:
    bn = nn.BatchNorm2d(3, momentum=0.01)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.BatchNorm2d(3, momentum=None))
    model(torch.randn(4, 3, 2, 2))
    model(torch.randn(4, 3, 2, 2))
    facts = batchnorm_facts(model)
    assert facts is not None and (facts.layers, facts.momenta, facts.updates) == (
        2,
        (None, 0.01),
        2,
    )
    assert facts.stale_share == 0.99**2
    assert batchnorm_facts(nn.Linear(2, 2)) is None
    untracked = nn.BatchNorm1d(2, track_running_stats=False)
    assert batchnorm_facts(untracked) is None


def test_results_that_cannot_be_read_as_flatness_are_flagged() -> None:
    result = {"train_accuracy": 0.9, "train_loss": 0.2, "flatness": {"0.01": 0.01, "0.1": 0.3},
              "flatness_std": {"0.01": 0.02, "0.1": 0.1}}  # fmt: skip
    model = nn.Linear(2, 10)
    assert flatness_flags(result, model, 10, 1000, draws=5) == []
    # a rise below zero within two standard errors of the mean is noise; beyond them it is not
    within = dict(result, flatness={"0.01": -0.017, "0.1": 0.3})
    assert flatness_flags(within, model, 10, 1000, draws=5) == []
    beyond = dict(result, flatness={"0.01": -0.018, "0.1": 0.3})
    (flag,) = flatness_flags(beyond, model, 10, 1000, draws=5)
    assert flag.startswith("noise of σ = 0.01 lowers its training loss")
    broken = dict(result, train_accuracy=0.1, train_loss=1.5e6)
    at_chance, huge = flatness_flags(broken, model, 10, 1000, draws=5)
    assert "10.00%, is no better than chance (1/10, 10.0%)" in at_chance
    assert at_chance.endswith(": it has not learnt it")
    assert huge.startswith("its training loss 1.5e+06 exceeds ln 10 = 2.303")


def test_flagged_results_are_left_out_of_the_figure() -> None:
    flagged, fine = {"flags": ["at chance"]}, {"flags": []}
    groups = {"dml": [flagged, fine], "broken": [flagged], "old": [{}]}
    assert readable_groups(groups) == {"dml": [fine], "old": [{}]}


def test_a_cohort_peer_whose_batchnorm_lags_is_named_in_the_run_the_report_and_analyze(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The commands as they run, but drawing no figure (PNGs cost seconds here and are tested
    in tests/test_report.py and tests/test_analyze.py): the analysis figure's groups recorded."""
    drawn = []
    monkeypatch.setattr(plots, "all_figures", lambda logs: {})
    monkeypatch.setattr(analyze, "flatness_plot", lambda *args: drawn.append(args) or args[2])
    config = tmp_path / "bn.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "bn", "log_every": 1, "progress_every_s": 0, "out_dir": str(tmp_path)},
        "data": {"name": "digits", "batch_size": 32},
        "cohort": {"peers": [{"name": "lag", "model": LAG},
                             {"name": "ok", "model": LAG, "args": {"momentum": 0.1}}]},
        "optim": {"lr": 0.1},
        "train": {"epochs": 1},
        "metrics": {"enabled": False},
        "checkpoint": {"enabled": False},
    }))  # fmt: skip
    code, out, err = cli_in_process(monkeypatch, capsys, "train", str(config))
    assert code == 0, err
    lines = out.splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, out
    (warning,) = warnings
    assert lines[lines.index(warning) - 1].startswith("epoch 1/1  step 44  lag 1")
    assert warning.startswith("warning: peer lag: test accuracy ")
    assert "likely BatchNorm's running statistics (1 layer, momentum 0.001, 44 updates" in warning
    run = tmp_path / "bn"
    logged = [json.loads(r) for r in (run / "peers" / "lag.jsonl").read_text().splitlines()]
    assert [r["message"] for r in logged if r["event"] == "warning"] == [warning]

    code, out, err = cli_in_process(monkeypatch, capsys, "report", str(run))
    assert code == 0, err
    assert out.splitlines()[-1] == warning
    assert f"- step 44: {warning}" in (run / "report" / "report.md").read_text()

    code, out, err = cli_in_process(
        monkeypatch, capsys, "analyze", str(run), "--sigma", "0.01,0.04", "--draws", "2"
    )
    assert code == 0, err
    flagged = [line for line in out.splitlines() if line.startswith("warning:")]
    assert flagged and all(line.startswith("warning: bn/lag: not readable as") for line in flagged)
    assert any("is no better than chance" in line for line in flagged), out
    rows = {line.split(" | ")[1]: line for line in out.splitlines() if line.startswith("| bn |")}
    assert rows["lag"].endswith("| ⚠ no, see below |") and rows["ok"].endswith("| yes |")
    peers = json.loads((run / "analysis.json").read_text())["peers"]
    assert peers["lag"]["flags"] and peers["ok"]["flags"] == []
    ((groups, sigmas, _),) = drawn  # flatness_plot leaves out what readable_groups does
    assert groups == {"bn": [peers["lag"], peers["ok"]]} and sigmas == [0.01, 0.04]
