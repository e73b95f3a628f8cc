"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no display, no
pyplot state): accuracy per epoch, divergence and entropy over steps, losses, time per step.

Every function takes a run's `RunLogs` and returns a Figure, or None when the logs hold
nothing to draw (e.g. a one-peer cohort has no divergence).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dml_cluster.run_folder import RunLogs, time_split

ENSEMBLE = "#222222"
PHASES = (("compute", "#4C72B0"), ("exchange", "#55A868"), ("wait", "#C44E52"))


def _colour(i: int) -> Any:
    return colormaps["tab10"](i % 10)


def smooth(values: list[float], points: int = 25) -> np.ndarray:
    """A centred moving average whose window grows with the series (about `points` windows)."""
    v = np.asarray(values, dtype=float)
    window = max(1, len(v) // points)
    if window == 1:
        return v
    kernel = np.ones(window)
    total = np.convolve(v, kernel, mode="same")
    count = np.convolve(np.ones_like(v), kernel, mode="same")
    return total / count


def _figure(rows: int, height: float = 3.2, width: float = 9.0) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in records if r.get(key) is not None]
    return [r["step"] for r in rows], [r[key] for r in rows]


def _train_line(ax: Axes, steps: list[int], values: list[float], colour: Any, label: str) -> None:
    """A noisy per-batch series: faint raw points, a solid smoothed line."""
    if len(values) > 25:
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(values), color=colour, linewidth=1.8, label=label)
    else:
        ax.plot(steps, values, color=colour, linewidth=1.8, marker=".", label=label)


def accuracy_figure(logs: RunLogs) -> Figure | None:
    if not logs.evals:
        return None
    fig, (ax,) = _figure(1, height=4.2)
    epochs = [e["epoch"] for e in logs.evals]
    for i, name in enumerate(logs.peers):
        acc = [100 * e["peers"][name]["accuracy"] for e in logs.evals]
        ax.plot(epochs, acc, marker="o", markersize=4, color=_colour(i),
                label=f"{name} ({acc[-1]:.2f}%)")  # fmt: skip
    if len(logs.peers) > 1:
        acc = [100 * e["ensemble"]["accuracy"] for e in logs.evals]
        ax.plot(epochs, acc, marker="s", markersize=4, color=ENSEMBLE, linestyle="--",
                linewidth=2.2, label=f"ensemble ({acc[-1]:.2f}%)")  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{logs.name}: test accuracy per peer and of the cohort ensemble")
    ax.legend(loc="lower right")
    return fig


DIVERGENCES = (
    ("kl", "KL(p_other ‖ p_peer) (nats)", False),
    ("js", "JS divergence (nats)", True),
    ("agreement", "top-1 agreement (%)", True),
)
"""(key, axis label, symmetric): a symmetric quantity has one value per pair of peers."""


@dataclass(frozen=True)
class Series:
    """One line of the divergence figure: its label, colour index, split, steps and values."""

    label: str
    colour: int
    split: str  # "train" (per logged batch) or "test" (per evaluation)
    steps: list[int]
    values: list[float]


def _pairs(logs: RunLogs, symmetric: bool) -> list[tuple[str, str]]:
    """(peer, other) pairs in peer order: both orders of each pair, or one for a quantity the
    same both ways (the other order would draw the same line on top of it)."""
    peers = logs.peers
    return [
        (a, b)
        for i, a in enumerate(peers)
        for j, b in enumerate(peers)
        if a != b and (i < j or not symmetric)
    ]


def divergence_series(logs: RunLogs) -> dict[str, list[Series]]:
    """The divergence figure's lines by quantity: for KL each ordered pair of peers (`peer ←
    other`: KL(p_other ‖ p_peer), which differs with the order); for JS and agreement each
    unordered pair once (`peer ↔ other`). Training batches from the peer's log, evaluations
    from the cohort's."""
    out: dict[str, list[Series]] = {}
    for key, _, symmetric in DIVERGENCES:
        scale = 100.0 if key == "agreement" else 1.0
        arrow = "↔" if symmetric else "←"
        lines = []
        for n, (peer, other) in enumerate(_pairs(logs, symmetric)):
            rows = [r for r in logs.train.get(peer, []) if other in r.get("pairs", {})]
            if rows:
                values = [scale * r["pairs"][other][key] for r in rows]
                steps = [r["step"] for r in rows]
                lines.append(Series(f"{peer} {arrow} {other} (train)", n, "train", steps, values))
            tests = [e for e in logs.evals if f"{peer}|{other}" in e.get("pairs", {})]
            if tests:
                values = [scale * e["pairs"][f"{peer}|{other}"][key] for e in tests]
                steps = [e["step"] for e in tests]
                lines.append(Series(f"{peer} {arrow} {other} (test)", n, "test", steps, values))
        out[key] = lines
    return out


def divergence_figure(logs: RunLogs) -> Figure | None:
    if len(logs.peers) < 2:
        return None
    fig, axes = _figure(len(DIVERGENCES), height=2.8)
    series = divergence_series(logs)
    for ax, (key, label, _) in zip(axes, DIVERGENCES, strict=True):
        for line in series[key]:
            if line.split == "train":
                _train_line(ax, line.steps, line.values, _colour(line.colour), line.label)
            else:
                ax.plot(line.steps, line.values, color=_colour(line.colour), marker="D",
                        markersize=4, linestyle=":", label=line.label)  # fmt: skip
        ax.set_ylabel(label)
        ax.legend(fontsize="small", ncol=2)
    axes[0].set_title(
        f"{logs.name}: how far apart the peers are\n(KL: peer ← the peer it learns from; "
        "JS and agreement: the same both ways, one line per pair)"
    )
    axes[-1].set_xlabel("step")
    return fig


def entropy_figure(logs: RunLogs) -> Figure | None:
    if not logs.evals and not any(logs.train.values()):
        return None
    fig, (ax,) = _figure(1, height=4.2)
    for i, name in enumerate(logs.peers):
        steps, values = _series(logs.train.get(name, []), "entropy")
        if steps:
            _train_line(ax, steps, values, _colour(i), f"{name} (train)")
        if logs.evals:
            ax.plot([e["step"] for e in logs.evals],
                    [e["peers"][name]["entropy"] for e in logs.evals],
                    color=_colour(i), marker="D", markersize=4, linestyle=":",
                    label=f"{name} (test)")  # fmt: skip
    if logs.evals and len(logs.peers) > 1:
        ax.plot([e["step"] for e in logs.evals], [e["ensemble"]["entropy"] for e in logs.evals],
                color=ENSEMBLE, marker="s", markersize=4, linestyle="--",
                label="ensemble (test)")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("mean posterior entropy (nats)")
    ax.set_title(f"{logs.name}: mean posterior entropy per peer and of the ensemble")
    ax.legend(fontsize="small", ncol=2)
    return fig


def loss_figure(logs: RunLogs) -> Figure | None:
    if not any(logs.train.values()):
        return None
    fig, axes = _figure(2, height=3.0)
    for ax, (key, label) in zip(axes, [("ce", "cross-entropy"), ("distill", "distillation term")],
                                strict=True):  # fmt: skip
        for i, name in enumerate(logs.peers):
            steps, values = _series(logs.train.get(name, []), key)
            if steps:
                _train_line(ax, steps, values, _colour(i), name)
        ax.set_ylabel(label)
    axes[0].set_title(f"{logs.name}: training losses")
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("step")
    return fig


def timing_figure(logs: RunLogs) -> Figure | None:
    splits = {n: time_split(logs.train.get(n, [])) for n in logs.peers}
    splits = {n: t for n, t in splits.items() if t is not None}
    if not splits:
        return None
    fig = Figure(figsize=(9.0, 3.0 + 0.45 * len(splits) + 3.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[1.0 + 0.3 * len(splits), 3.0])
    names = list(splits)
    left = np.zeros(len(names))
    for phase, colour in PHASES:
        width = np.array([1000 * getattr(splits[n], "transfer" if phase == "exchange" else phase)
                          for n in names])  # fmt: skip
        top.barh(names, width, left=left, color=colour, label=phase)
        left += width
    for y, total in enumerate(left):
        top.text(total, y, f" {total:.2f} ms", va="center", fontsize="small")
    top.invert_yaxis()
    top.set_xlim(0, max(left.max(), 1e-9) * 1.18)
    top.set_xlabel("mean time per step (ms)")
    top.set_title(f"{logs.name}: where a step's time goes")
    top.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    for i, name in enumerate(names):
        rows = [r for r in logs.train.get(name, []) if "step_seconds" in r]
        steps = [r["step"] for r in rows]
        _train_line(bottom, steps, [1000 * r["step_seconds"] for r in rows], _colour(i),
                    f"{name} step")  # fmt: skip
        waits = [1000 * r.get("step_wait_seconds", 0.0) for r in rows]
        if any(waits):
            bottom.plot(steps, smooth(waits), color=_colour(i), linestyle="--", linewidth=1.2,
                        label=f"{name} wait")  # fmt: skip
    bottom.set_xlabel("step")
    bottom.set_ylabel("time per step (ms)")
    bottom.set_ylim(bottom=0)
    bottom.grid(True, alpha=0.3)
    bottom.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    return fig


FIGURES = {
    "accuracy": accuracy_figure,
    "divergence": divergence_figure,
    "entropy": entropy_figure,
    "loss": loss_figure,
    "timing": timing_figure,
}


def all_figures(logs: RunLogs) -> dict[str, Figure]:
    figures = {key: draw(logs) for key, draw in FIGURES.items()}
    return {key: fig for key, fig in figures.items() if fig is not None}


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, facecolor="white")
