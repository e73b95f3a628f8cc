"""Helpers for the metrics tests: scrape an endpoint, read samples, replay a run in the oracle."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from dml_cluster.metrics.events import EvalEvent, StepEvent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        return response.read().decode()


def parse(text: str) -> Samples:
    """{(sample name, sorted labels): value} of an exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def endpoints(run_dir: Path, peers: Sequence[str], timeout: float = 120.0) -> dict[str, dict]:
    """The endpoint records the peers write to <run dir>/metrics/<peer>.json, once all exist."""
    deadline = time.monotonic() + timeout
    while True:
        files = {p: run_dir / "metrics" / f"{p}.json" for p in peers}
        if all(f.exists() for f in files.values()):
            return {p: json.loads(f.read_text()) for p, f in files.items()}
        if time.monotonic() > deadline:
            raise TimeoutError(f"no metrics endpoint files under {run_dir / 'metrics'}")
        time.sleep(0.05)


def promtool_check(text: str) -> subprocess.CompletedProcess:
    """`promtool check metrics` on an exposition (Debian's prometheus package)."""
    return subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )


class Recorder:
    """An observer keeping every step's log-probabilities and targets (the oracle's view)."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple[dict[int, torch.Tensor], torch.Tensor]] = {}
        self.evals: list[dict[str, Any]] = []

    def wants_batch_stats(self, step: int) -> bool:
        return False  # it keeps the raw predictions instead

    def on_step(self, event: StepEvent) -> None:
        log_ps = {i: t.detach().cpu().double().clone() for i, t in event.log_ps.items()}
        self.steps[event.step] = (log_ps, event.target.cpu().clone())

    def on_eval(self, event: EvalEvent) -> None:
        self.evals.append({"epoch": event.epoch, "step": event.step, **event.report})

    def on_end(self, summary: dict[str, Any]) -> None:
        pass


def kl_numpy(log_q: torch.Tensor, log_p: torch.Tensor) -> float:
    """KL(q || p), summed over classes, averaged over samples, written out in numpy."""
    lq, lp = log_q.numpy(), log_p.numpy()
    return float(np.mean(np.sum(np.exp(lq) * (lq - lp), axis=1)))


def agreement_numpy(log_a: torch.Tensor, log_b: torch.Tensor) -> float:
    return float(np.mean(log_a.numpy().argmax(1) == log_b.numpy().argmax(1)))


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """The moving average the exporter documents: new = s * old + (1 - s) * value."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else smoothing * out[-1] + (1 - smoothing) * v)
    return out


def sampled(steps: Sequence[int], every: int) -> list[int]:
    """The steps whose batch statistics the exporter reads (`metrics.stats_every`)."""
    return [s for s in steps if s % every == 0]


def ema_at(
    steps: Sequence[int], values: Sequence[float], smoothing: float, until: int
) -> dict[int, float]:
    """{step s: the moving average of the values of the given steps up to s}, for every s from
    the first given step to `until` (after a sampled step, until the next, that step's)."""
    averaged = dict(zip(steps, ema(values, smoothing), strict=True))
    out, current = {}, None
    for s in range(steps[0], until + 1):
        current = averaged.get(s, current)
        out[s] = current
    return out


def close(a: float, b: float, tol: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=0.0, abs_tol=tol)
