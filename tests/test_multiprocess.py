"""One process per peer, started by torch's elastic launcher (torchrun), over real sockets.

The oracle: every peer's final weights equal the one-process engine's on the same config and
seed (in practice bitwise; the bar is 1e-6), for zmq and torch, simultaneous and sequential.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import CLI, REPO, cli_env, final_weights, max_weight_diff, run_cli

TWO_HETERO = [
    "--set", "cohort.size=null", "--set", "cohort.model=null",
    "--set", "cohort.peers=[{name: mlp, model: mlp, args: {hidden: [64]}}, "
    "{name: cnn, model: small_cnn, args: {width: 8}}]",
]  # fmt: skip
COHORTS = {
    "k2": ("configs/digits-dml.yaml", TWO_HETERO),
    "k3": ("configs/digits-k3-hetero.yaml", []),
}
STEPS = ["--set", "train.max_steps=24"]  # 22 steps per epoch: crosses an epoch boundary

_oracle_cache: dict[tuple, Path] = {}


def _oracle(tmp_root: Path, config: str, extra: list[str]) -> Path:
    """The one-process engine's run folder for this config (computed once per session)."""
    key = (config, *extra)
    if key not in _oracle_cache:
        out = tmp_root / f"oracle-{len(_oracle_cache)}"
        proc = run_cli("train", config, "--set", f"run.out_dir={out}", "--set", "run.name=r",
                       *STEPS, *extra)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        _oracle_cache[key] = out / "r"
    return _oracle_cache[key]


def _distributed(out: Path, config: str, extra: list[str], transport: str) -> Path:
    proc = run_cli(
        "train", config, "--set", f"run.out_dir={out}", "--set", "run.name=r",
        "--set", f"bus.transport={transport}", *STEPS, *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "r"


@pytest.fixture(scope="module")
def oracle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oracle")


@pytest.mark.parametrize("update", ["simultaneous", "sequential"])
@pytest.mark.parametrize("transport", ["zmq", "torch"])
@pytest.mark.parametrize("cohort", ["k2", "k3"])
def test_processes_match_one_process_engine(
    oracle_root: Path, tmp_path: Path, cohort: str, transport: str, update: str
) -> None:
    config, extra = COHORTS[cohort]
    extra = [*extra, "--set", f"cohort.update={update}"]
    expected = final_weights(_oracle(oracle_root, config, extra))
    got = final_weights(_distributed(tmp_path, config, extra, transport))
    assert len(got) == int(cohort[1])
    assert max_weight_diff(expected, got) <= 1e-6


@pytest.mark.parametrize("transport", ["zmq", "torch"])
@pytest.mark.parametrize("config", ["configs/digits-semi.yaml", "configs/digits-dml-e.yaml"])
def test_semi_supervised_and_dml_e_match_across_processes(
    oracle_root: Path, tmp_path: Path, config: str, transport: str
) -> None:
    expected = final_weights(_oracle(oracle_root, config, []))
    got = final_weights(_distributed(tmp_path, config, [], transport))
    assert max_weight_diff(expected, got) <= 1e-6


def test_rank_zero_writes_cohort_summary(tmp_path: Path) -> None:
    run_dir = _distributed(tmp_path, "configs/digits-dml.yaml", [], "zmq")
    summary = (run_dir / "summary.json").read_text()
    assert '"transport": "zmq"' in summary and '"ensemble"' in summary
    assert sorted(p.name for p in (run_dir / "peers").iterdir()) == [
        "small_cnn-0.jsonl", "small_cnn-1.jsonl",
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["zmq", "torch"])
def test_killed_peer_stops_the_others_naming_it(tmp_path: Path, transport: str) -> None:
    """Peers started as separate processes (as on two nodes): kill one, the other must stop."""
    timeout_s = 5
    port = _free_port()
    procs = []
    for rank in range(2):
        env = cli_env()
        env.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        args = [
            "train", "configs/digits-dml.yaml", "--set", f"run.out_dir={tmp_path}",
            "--set", f"bus.transport={transport}", "--set", f"bus.timeout_s={timeout_s}",
            "--set", "train.epochs=1000", "--set", "run.log_every=1",
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                [*CLI, *args],
                cwd=REPO,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    try:
        log = tmp_path / "digits-dml" / "peers" / "small_cnn-1.jsonl"
        deadline = time.monotonic() + 120
        while not (log.exists() and log.read_text().count("\n") >= 5):
            assert time.monotonic() < deadline, "the cohort never got going"
            assert procs[0].poll() is None and procs[1].poll() is None
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 200, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dml-cluster: ") and "small_cnn-1" in last, err
    if transport == "zmq":
        assert "peer 1 (small_cnn-1, rank 1)" in last and "last step seen" in last
    assert waited < timeout_s + 30, waited
