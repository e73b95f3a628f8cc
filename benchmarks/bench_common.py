"""Helpers shared by the benchmark scripts: summary statistics, Markdown tables, the machine."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence

import numpy as np


def summary_us(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p99 and mean of durations given in seconds, in microseconds."""
    us = np.asarray(seconds, dtype=np.float64) * 1e6
    return {
        "median_us": float(np.median(us)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "n": int(us.size),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""
    align = ["---:" if isinstance(c, (int, float)) else "---" for c in rows[0]] if rows else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align or ["---"] * len(header)) + "|"]
    for row in rows:
        cells = [_number(c) if isinstance(c, float) else str(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def own_session() -> None:
    """Put this process in a session of its own, as torchrun does with every worker.

    Linux's autogroup scheduler (on by default) shares the CPU fairly between sessions, then
    between the processes of a session: on a shared machine, peers launched in one session get
    one share between them, while torchrun's workers (start_new_session=True) get one each.
    """
    if os.getsid(0) != os.getpid():
        os.setsid()


def _number(x: float) -> str:
    """About three significant digits, thousands separated."""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def machine() -> str:
    """One line describing where the numbers were taken."""
    import torch
    import zmq

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} x {cpu}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, pyzmq {zmq.__version__}"
    )
