"""`dml-cluster report RUN_DIR` on real runs: the PNG plots open as images of a sensible size,
the Markdown page carries the summary and the per-class table; bad folders are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dml_cluster import plots
from dml_cluster.report import load_run, write_report
from dml_cluster.run_folder import time_split

from .conftest import run_cli

PLOTS = ("accuracy", "divergence", "entropy", "loss", "timing")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-peer cohort over zmq (two processes), so the time split has real exchange and wait."""
    out_dir = tmp_path_factory.mktemp("runs")
    proc = run_cli(
        "train", "configs/digits-dml.yaml", "--set", f"run.out_dir={out_dir}",
        "--set", "bus.transport=zmq", "--set", "train.epochs=3", "--set", "run.log_every=2",
        "--set", "metrics.enabled=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out_dir / "digits-dml"


def test_report_writes_plots_and_a_summary_page(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_cli("report", str(finished_run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"report: {out / 'report.md'}"
    for name in PLOTS:
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 800 <= width <= 1400 and 300 <= height <= 1400, (name, image.size)
            pixels = np.asarray(image.convert("L"), dtype=float)
        # something is drawn: not a blank canvas, mostly white background
        assert pixels.std() > 10 and (pixels > 250).mean() > 0.5, name
    page = (out / "report.md").read_text()
    assert page.startswith("# Run report: digits-dml")
    for name in PLOTS:
        assert f"]({name}.png)" in page
    assert "| **ensemble** |" in page and "## Per-class test accuracy (epoch 3, %)" in page
    assert page.count("\n| 7 |") == 1 and "| **overall** |" in page
    assert "| small_cnn-0 | small_cnn-1 |" in page  # the final divergence table
    assert "## Time per step" in page


def test_time_split_adds_up(finished_run: Path) -> None:
    logs = load_run(finished_run)
    assert logs.peers == ["small_cnn-0", "small_cnn-1"]
    for peer in logs.peers:
        split = time_split(logs.train[peer])
        assert split is not None and split.steps_logged == 33  # 66 steps, logged every 2
        total = split.compute + split.transfer + split.wait
        assert abs(total - split.step) < 1e-9
        assert min(split.compute, split.transfer, split.wait) >= 0.0
    records = logs.train["small_cnn-0"]
    assert all(set(r["pairs"]) == {"small_cnn-1"} for r in records)
    assert all(0.0 <= r["train_accuracy"] <= 1.0 and r["entropy"] >= 0.0 for r in records)


def test_report_of_an_unfinished_run(finished_run: Path, tmp_path: Path) -> None:
    """A run still training (or stopped): no summary.json, a half-written last log line."""
    run = tmp_path / "partial"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("summary.json", "report"))
    with (run / "peers" / "small_cnn-0.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 9')  # no newline: still being written
    files = write_report(run)
    assert files[0] == run / "report" / "report.md"
    assert {p.stem for p in files[1:]} == set(PLOTS)
    page = files[0].read_text()
    assert "no summary.json" in page and "| **overall** |" in page


def test_report_of_one_peer_has_no_divergence_plot(tmp_path: Path) -> None:
    run = tmp_path / "solo"
    (run / "peers").mkdir(parents=True)
    per_class = [0.5] * 10
    record = {
        "event": "eval", "epoch": 1, "step": 4, "pairs": {},
        "peers": {"mlp": {"accuracy": 0.5, "entropy": 1.0, "per_class": per_class}},
        "ensemble": {"accuracy": 0.5, "entropy": 1.0, "per_class": per_class},
    }  # fmt: skip
    (run / "cohort.jsonl").write_text(json.dumps(record) + "\n")
    (run / "peers" / "mlp.jsonl").write_text(
        json.dumps(
            {
                "event": "train",
                "step": 0,
                "epoch": 0,
                "ce": 2.0,
                "distill": 0.0,
                "step_seconds": 0.01,
                "exchange_seconds": 0.0,
            }
        )
        + "\n"  # fmt: skip
    )
    names = {p.stem for p in write_report(run)[1:]}
    assert names == {"accuracy", "entropy", "loss", "timing"}


def test_a_run_logged_before_the_distill_rename_reports_its_mimicry_as_distill(
    tmp_path: Path,
) -> None:
    """Training records of older versions name the second loss term `mimicry`: the report reads
    it as `distill` and charts it."""
    run = tmp_path / "old"
    (run / "peers").mkdir(parents=True)
    records = [
        {"event": "train", "step": s, "epoch": 0, "ce": 2.0 - s / 10, "mimicry": 0.25 + s / 100}
        for s in range(3)
    ]
    (run / "peers" / "mlp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    logs = load_run(run)
    assert [r["distill"] for r in logs.train["mlp"]] == [0.25, 0.26, 0.27]
    assert all("mimicry" not in r for r in logs.train["mlp"])
    loss = plots.loss_figure(logs)
    assert loss is not None
    drawn = [line.get_ydata().tolist() for line in loss.axes[1].get_lines()]
    assert [0.25, 0.26, 0.27] in drawn


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such run folder"),
        (lambda p: p, "not a run folder (no cohort.jsonl, no peers/*.jsonl logs)"),
        (lambda p: _broken_log(p), "cohort.jsonl:2: not a JSON record"),
    ],
)
def test_bad_run_folders_are_one_line_errors(tmp_path: Path, make, message: str) -> None:
    proc = run_cli("report", str(make(tmp_path)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dml-cluster: report: ") and message in lines[0]


def _broken_log(path: Path) -> Path:
    (path / "cohort.jsonl").write_text('{"event": "eval"}\nnot json\n{"event": "eval"}\n')
    return path
