"""Shared test helpers: run the real CLI in a subprocess, load final weights, compare them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dml_cluster"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_cli(*args: str, timeout: float = 240, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`dml-cluster ARGS` as a real process; stdout and stderr captured as text."""
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        p.stem: torch.load(p, weights_only=True) for p in sorted((run_dir / "final").glob("*.pt"))
    }


def max_weight_diff(
    a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]
) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    worst = 0.0
    for peer in a:
        assert a[peer].keys() == b[peer].keys()
        for k in a[peer]:
            diff = (a[peer][k].double() - b[peer][k].double()).abs().max().item()
            worst = max(worst, diff)
    return worst


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"
