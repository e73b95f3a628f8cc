"""Helpers for the checkpoint, fault, CURVE and soak tests: real CLI processes, folder snapshots."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/digits-dml.yaml"  # 2 small CNNs on digits: 22 steps per epoch


def settings(out_dir: Path, name: str, *extra: str, epochs: int = 4) -> list[str]:
    """`--set` arguments for a small, quiet run whose checkpoints every 10 steps are all kept;
    a lost peer is noticed within 20 s in every phase (steps, checkpoints, evaluations)."""
    items = [
        f"run.out_dir={out_dir}", f"run.name={name}", f"train.epochs={epochs}",
        "metrics.enabled=false", "checkpoint.every_steps=10", "checkpoint.keep=100",
        "bus.timeout_s=20", "bus.startup_timeout_s=20", *extra,
    ]  # fmt: skip
    return [arg for item in items for arg in ("--set", item)]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return out


def command(*args: str, config: str = CONFIG) -> list[str]:
    return [sys.executable, "-m", "dml_cluster", "train", config, *args]


def train(*args: str, timeout: float = 300, config: str = CONFIG, **env_extra: str):
    """`dml-cluster train CONFIG ARGS` as a real process; output captured as text."""
    return subprocess.run(
        command(*args, config=config), cwd=REPO, env=env(**env_extra),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def start(*args: str, config: str = CONFIG, **env_extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        command(*args, config=config), cwd=REPO, env=env(**env_extra),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The peer processes torchrun started under `launcher`, by LOCAL_RANK."""
    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("LOCAL_RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found[int(rank)] = child
    return found


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): proves a failed run changed nothing."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def steps(run_dir: Path) -> list[int]:
    """Steps with a checkpoint folder (complete or not)."""
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(
        int(p.parent.name.split("-")[1])
        for p in (run_dir / "checkpoints").glob("step-*/manifest.json")
    )


def cut_back_to(run_dir: Path, step: int) -> None:
    """The folder as a run killed right after checkpoint `step` leaves it: later steps, final
    weights and summary gone (the logs may hold later records, as after a real kill)."""
    for s in steps(run_dir):
        if s > step:
            shutil.rmtree(run_dir / "checkpoints" / f"step-{s:09d}")
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    (run_dir / "summary.json").unlink(missing_ok=True)


def one_line_error(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    """A clear message, no traceback."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    for phrase in phrases:
        assert phrase in text, text


def lines(text: str, needle: str) -> Iterable[str]:
    return [line for line in text.splitlines() if needle in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peers(args_by_rank: list[list[str]], **env_extra: str) -> list[subprocess.Popen]:
    """One peer process per rank, started by hand the way a multi-node launcher would (RANK,
    WORLD_SIZE, MASTER_ADDR/PORT in the environment; rank 0 hosts the store)."""
    port, world = free_port(), len(args_by_rank)
    procs = []
    for rank, args in enumerate(args_by_rank):
        peer_env = dict(
            RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), **env_extra,
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                command(*args),
                cwd=REPO,
                env=env(**peer_env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs
