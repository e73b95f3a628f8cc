"""Helpers shared by the benchmark scripts: summary statistics, Markdown tables, the machine."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = (".json", ".md", ".png")  # what the benchmarks write next to themselves


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


def command() -> str:
    """The command that is running, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def commit() -> str:
    """The commit measured, and what of the working tree differs from it.

    A change under dml_cluster/ (or anywhere outside benchmarks/) is "+ uncommitted changes";
    a change to a benchmark script is named; the benchmarks' own outputs do not count.
    """
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = [line.split(maxsplit=1)[1] for line in status.splitlines() if line.strip()]
    dirty = [p for p in dirty if not (p.startswith("benchmarks/") and p.endswith(OUTPUTS))]
    if any(not p.startswith("benchmarks/") for p in dirty):
        return sha + " + uncommitted changes"
    if dirty:
        return sha + " (the benchmark script itself changed since: " + ", ".join(dirty) + ")"
    return sha


def package_commit() -> str:
    """The last commit that changed dml_cluster/: the code measured, named by a commit that
    stays valid when a branch that only changes benchmarks/ is rebased."""
    try:
        return _git("log", "-1", "--format=%h", "--", "dml_cluster") or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def provenance() -> dict[str, str]:
    """What every benchmark records with its numbers: the exact command, the commit, and the
    last commit that changed the package."""
    return {"command": command(), "commit": commit(), "package": package_commit()}


def provenance_lines() -> str:
    """The command, the commit and the package's commit, one line each, for the top of a
    benchmark's output."""
    p = provenance()
    return (
        f"command: {p['command']}\ncommit: {p['commit']}\n"
        f"package (dml_cluster/ last changed at): {p['package']}"
    )


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, text=True, capture_output=True, check=True
    ).stdout.strip()
