"""The Grafana dashboard and alert rules in monitoring/: every query parses (promtool) and asks
only for metrics a real exporter serves; the panels an operator needs are there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from dml_cluster.bus.local import LocalBus
from dml_cluster.config import load_config
from dml_cluster.metrics import metrics_observers
from dml_cluster.metrics.exporter import RENAMED_METRICS
from dml_cluster.trainer import CohortTrainer, Placement

from .conftest import REPO
from .metrics_helpers import parse, scrape

DASHBOARD = REPO / "monitoring" / "grafana-dashboard.json"
ALERTS = REPO / "monitoring" / "alerts.yml"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$peer": ".*"}


def _panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def _exprs() -> list[str]:
    exprs = [t["expr"] for p in _panels() for t in p["targets"]]
    for name, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(name, value) for e in exprs]
    return exprs


@pytest.fixture(scope="module")
def served_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names a real exporter serves after a few steps and an evaluation."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        REPO / "configs" / "digits-dml.yaml",
        [f"run.out_dir={out}", "metrics.port=0", "metrics.address=127.0.0.1", "train.max_steps=3"],
    )
    threads = torch.get_num_threads()
    try:
        with metrics_observers(cfg, (0, 1), "x") as observers:
            placement = Placement((0, 1), torch.device("cpu"), reporter=True)
            CohortTrainer(cfg, LocalBus(), placement, observers).run()
            text = scrape(observers[0].url)
    finally:
        torch.set_num_threads(threads)
    return {name for name, _ in parse(text)}


def test_dashboard_asks_only_for_served_metrics(served_names: set[str]) -> None:
    """Served metrics, and a renamed metric's old name only next to its new one."""
    wanted = {m for e in _exprs() for m in re.findall(r"\bdml_[a-z_]+\b", e)}
    assert wanted, "no dml_ metric in the dashboard"
    old = {m for m in wanted if m in RENAMED_METRICS}
    assert wanted - old <= served_names, sorted(wanted - old - served_names)
    for e in _exprs():
        for name in set(re.findall(r"\bdml_[a-z_]+\b", e)) & old:
            assert f" or {name}" in e and RENAMED_METRICS[name] in e, e
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    alerting = {m for r in rules for m in re.findall(r"\bdml_[a-z_]+\b", r["expr"])}
    assert alerting <= served_names, sorted(alerting - served_names)


def test_dashboard_has_the_operator_panels() -> None:
    panels = _panels()
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(_exprs())
    for metric in (
        "dml_kl_divergence", "dml_accuracy_ratio", "dml_ensemble_accuracy_ratio",
        "dml_posterior_entropy_nats", "dml_step_duration_seconds", "dml_exchange_duration_seconds",
        "dml_bus_wait_seconds_total", "dml_train_samples_total",
    ):  # fmt: skip
        assert metric in exprs, metric
    divergence = [p for p in panels if "dml_kl_divergence" in json.dumps(p["targets"])]
    assert all("{{peer}} ← {{other_peer}}" in t["legendFormat"] for p in divergence
               for t in p["targets"])  # fmt: skip
    # a 24-column grid without overlaps
    cells: set[tuple[int, int]] = set()
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_every_query_and_alert_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian's prometheus package)")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(_exprs())
                ],
            }
        ]
    }
    checked = tmp_path / "dashboard-rules.yml"
    checked.write_text(yaml.safe_dump(rules, allow_unicode=True))
    proc = subprocess.run(
        [promtool, "check", "rules", str(checked), str(ALERTS)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
