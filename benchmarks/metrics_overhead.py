"""What watching a cohort costs: the Prometheus exporter's work per training step, and a scrape.

The one-process engine (all K peers in this process, one thread) trains a digits cohort with the
exporter installed; the exporter's `on_step` is timed call by call and compared with the step it
follows (`step_seconds`: forward, exchange, backward, update). A scrape (rendering the
exposition, which holds the lock `on_step` takes) is timed separately. With metrics disabled the
exporter is not installed at all: its cost is zero by construction (tests/test_metrics_e2e.py
checks nothing is loaded or bound).

Run from the repo root: .venv/bin/python benchmarks/metrics_overhead.py [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from dml_cluster.bus.local import LocalBus  # noqa: E402
from dml_cluster.cohort import set_determinism  # noqa: E402
from dml_cluster.config import parse_config  # noqa: E402
from dml_cluster.metrics import metrics_observers  # noqa: E402
from dml_cluster.trainer import CohortTrainer, Placement  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, markdown_table  # noqa: E402

MODELS = {"mlp": {"hidden": [128]}, "small_cnn": {"width": 16}}


class Timed:
    """Wraps an observer and keeps the duration of each on_step call, and the step's own time."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.steps = inner, [], []

    def on_step(self, trainer, event) -> None:
        t0 = time.perf_counter()
        self.inner.on_step(trainer, event)
        self.calls.append(time.perf_counter() - t0)
        self.steps.append(event.step_seconds)

    def on_eval(self, trainer, epoch, step, report) -> None:
        self.inner.on_eval(trainer, epoch, step, report)

    def on_end(self, trainer, summary) -> None:
        self.inner.on_end(trainer, summary)


def measure(model: str, k: int, steps: int, out: Path) -> list[object]:
    cfg = parse_config({
        "run": {"name": f"{model}-{k}", "out_dir": str(out), "log_every": 10_000},
        "cohort": {"size": k, "model": model, "args": MODELS[model]},
        "train": {"epochs": 1000, "max_steps": steps},
        "metrics": {"port": 0, "address": "127.0.0.1"},
    })  # fmt: skip
    set_determinism(cfg)
    hosted = tuple(range(k))
    with metrics_observers(cfg, hosted, "bench") as (exporter,):
        timed = Timed(exporter)
        CohortTrainer(cfg, LocalBus(), Placement(hosted, torch.device("cpu"), True), [timed]).run()
        renders = []
        for _ in range(50):
            t0 = time.perf_counter()
            body = generate_latest(exporter.registry)
            renders.append(time.perf_counter() - t0)
    calls = np.asarray(timed.calls[10:]) * 1e6  # skip warm-up
    step = np.asarray(timed.steps[10:]) * 1e3
    return [
        model, k, float(np.median(step)), float(np.median(calls)), float(np.percentile(calls, 99)),
        float(100 * np.median(calls) / 1e3 / np.median(step)), float(np.median(renders) * 1e3),
        len(body),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for k in (2, 4):
                rows.append(measure(model, k, args.steps, Path(tmp)))
    header = [
        "model", "K", "step ms (median)", "on_step µs (median)", "on_step µs (p99)",
        "overhead % of step", "scrape render ms", "exposition bytes",
    ]  # fmt: skip
    print(machine())
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
