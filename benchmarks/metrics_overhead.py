"""What watching a cohort costs: the observers' work per training step, and a scrape.

The one-process engine (all K peers in this process, one thread) trains a digits cohort with the
Prometheus exporter installed. After every step the trainer builds the step's event (losses as
floats, learning rates, a copy of the bus counters and, on the steps an observer asks for them,
the batch statistics of every hosted peer) and hands it to the observers. That whole phase is
timed step by step and divided by the step it follows (`step_seconds`: forward, exchange,
backward, update), both measured in the same run, two ways: the medians of the observe phase on
steps with and without statistics, weighted by how often each occurs, over the median step
(robust to a preemption landing in a short window on a shared machine); the mean observe phase
over the mean step (the share of wall time); and the same in this thread's CPU time, which
leaves out the time other processes held the CPU (the fairest figure on a loaded machine). The
run log's own records are pushed out of the measured steps (`run.log_every` larger than the run:
it logs step 0, inside the warm-up left out) so the row is the exporter's cost; with
the defaults the run log asks for statistics on the same steps as the exporter and they are
computed once for both. A scrape (rendering the exposition, under the lock `on_step` takes) is
timed separately. With metrics disabled the exporter is not installed at all (tests check that
nothing is loaded or bound); the event is still built for the run log.

The objects alive when training starts (torch and the other imports, the data; the script prints
how many and what one full collection of them takes) are moved out of the garbage collector's
sight (`gc.freeze()`) for the measured run: otherwise a full collection over all of them lands at
random in the step or in the observe phase and decides the mean of whichever it hits. The
young-generation collections, which every allocation brings closer, still run and are paid where
they happen.

Run from the repo root: .venv/bin/python benchmarks/metrics_overhead.py [--steps 400]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from dml_cluster.bus.local import LocalBus  # noqa: E402
from dml_cluster.config import MetricsConfig, parse_config  # noqa: E402
from dml_cluster.determinism import set_determinism  # noqa: E402
from dml_cluster.metrics import metrics_observers  # noqa: E402
from dml_cluster.metrics.events import EvalEvent, StepEvent  # noqa: E402
from dml_cluster.trainer import CohortTrainer, Placement, StepResult  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, markdown_table, provenance_lines  # noqa: E402

MODELS = {"mlp": {"hidden": [128]}, "small_cnn": {"width": 16}}
WARM_UP = 10  # steps left out of the figures
DEFAULT_STATS_EVERY = MetricsConfig.model_fields["stats_every"].default
FULL_COLLECTIONS: list[tuple[int, float]] = []  # (objects tracked, seconds) before each run


class TimedTrainer(CohortTrainer):
    """The trainer, keeping for each step its duration and that of handing it to observers, in
    wall time and in this thread's CPU time (which a preemption by another process leaves out)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_seconds: list[float] = []
        self.observe_seconds: list[float] = []
        self.step_cpu: list[float] = []
        self.observe_cpu: list[float] = []

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, step: int, fp: int, ids: Any = None
    ) -> StepResult:
        cpu0 = time.thread_time()
        result = super().train_step(x, y, step, fp, ids)
        self.step_cpu.append(time.thread_time() - cpu0)
        return result

    def _observe_step(
        self, step: int, epoch: int, target: torch.Tensor, result: StepResult
    ) -> None:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        super()._observe_step(step, epoch, target, result)
        self.observe_cpu.append(time.thread_time() - cpu0)
        self.observe_seconds.append(time.perf_counter() - t0)
        self.step_seconds.append(result.times.step_seconds)  # the host clock: on the CPU


class Timed:
    """Wraps an observer and keeps the duration of each `on_step` call, and whether that step
    carried batch statistics."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls, self.sampled = inner, [], []

    def wants_batch_stats(self, step: int) -> bool:
        return self.inner.wants_batch_stats(step)

    def on_step(self, event: StepEvent) -> None:
        t0 = time.perf_counter()
        self.inner.on_step(event)
        self.calls.append(time.perf_counter() - t0)
        self.sampled.append(event.has_batch_stats)

    def on_eval(self, event: EvalEvent) -> None:
        self.inner.on_eval(event)

    def on_end(self, summary: dict[str, Any]) -> None:
        self.inner.on_end(summary)


def measure(model: str, k: int, stats_every: int, steps: int, out: Path) -> list[object]:
    cfg = parse_config({
        "run": {"name": f"{model}-{k}-{stats_every}", "out_dir": str(out), "log_every": 10**9},
        "cohort": {"size": k, "model": model, "args": MODELS[model]},
        "train": {"epochs": 1000, "max_steps": steps},
        "metrics": {"port": 0, "address": "127.0.0.1", "stats_every": stats_every},
    })  # fmt: skip
    set_determinism(cfg)
    hosted = tuple(range(k))
    with metrics_observers(cfg, hosted, "bench") as (exporter,):
        timed = Timed(exporter)
        placement = Placement(hosted, torch.device("cpu"), True)
        trainer = TimedTrainer(cfg, LocalBus(), placement, [timed])
        t0, tracked = time.perf_counter(), len(gc.get_objects())
        gc.collect()
        FULL_COLLECTIONS.append((tracked, time.perf_counter() - t0))
        gc.freeze()  # see the module docstring
        try:
            trainer.run()
        finally:
            gc.unfreeze()
        renders = []
        for _ in range(50):
            t0 = time.perf_counter()
            body = generate_latest(exporter.registry)
            renders.append(time.perf_counter() - t0)
    step = np.asarray(trainer.step_seconds[WARM_UP:])
    step_cpu = np.asarray(trainer.step_cpu[WARM_UP:])
    observe_cpu = np.asarray(trainer.observe_cpu[WARM_UP:])
    observe = np.asarray(trainer.observe_seconds[WARM_UP:])
    on_step = np.asarray(timed.calls[WARM_UP:])
    sampled = np.asarray(timed.sampled[WARM_UP:])
    with_stats = float(np.median(observe[sampled]))
    without = float(np.median(observe[~sampled])) if (~sampled).any() else 0.0
    share = float(sampled.mean())
    amortized = share * with_stats + (1 - share) * without  # medians: robust to preemption
    return [
        model, k, stats_every, float(np.median(step) * 1e3), float(step_cpu.mean() * 1e3),
        with_stats * 1e6, without * 1e6 if (~sampled).any() else "-",
        float(observe_cpu.mean() * 1e6), float(on_step.mean() * 1e6),
        float(100 * amortized / np.median(step)), float(100 * observe.mean() / step.mean()),
        float(100 * observe_cpu.mean() / step_cpu.mean()),
        float(np.median(renders) * 1e3), len(body),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="a few steps, K = 2 only")
    args = parser.parse_args()
    steps, sizes = (WARM_UP + 30, (2,)) if args.quick else (args.steps, (2, 4))
    rows, load_before = [], load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for k in sizes:
                for every in sorted({1, DEFAULT_STATS_EVERY}):
                    rows.append(measure(model, k, every, steps, Path(tmp)))
    header = [
        "model", "K", "stats_every", "step ms (median)", "step CPU ms (mean)",
        "observe µs, stats step (median)", "observe µs, other step (median)",
        "observe CPU µs (mean)", "exporter on_step µs (mean)",
        "overhead %: amortized medians", "overhead %: mean / mean", "overhead %: CPU mean / mean",
        "scrape render ms", "exposition bytes",
    ]  # fmt: skip
    print(provenance_lines())
    print(machine())
    print(f"load average before: {load_before}; after: {load_average()} ({os.cpu_count()} CPUs)")
    objects, seconds = np.median(np.asarray(FULL_COLLECTIONS), axis=0)
    print(
        f"a full garbage collection before a run (median of {len(FULL_COLLECTIONS)}): "
        f"{objects:,.0f} objects tracked, {seconds * 1e3:.0f} ms"
    )
    print(markdown_table(header, rows))


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    main()
