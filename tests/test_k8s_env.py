"""The env each manifest gives its container is the env torchrun and the trainer read.

`dml-cluster k8s render` writes the manifests; every pod's command line then runs as a local
process with the manifest's env plus what the cluster adds (tests/k8s_helpers.py), the cluster's
DNS names pointing at 127.0.0.1. The cohort must finish with the one-process engine's weights.
(tests/test_multinode_netns.py runs the Indexed Job's pods on two real network hosts.)
"""

from __future__ import annotations

import socket
from pathlib import Path

from .conftest import assert_same_states, run_cli
from .k8s_helpers import (
    CONFIG,
    RUN,
    SETS,
    find,
    indexed_job_pods,
    load_dir,
    one_process_reference,  # noqa: F401 - the `reference` fixture
    pytorchjob_pods,
    start,
    wait_all,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(out: Path, engine: str, *extra: str) -> dict:
    """The manifests, and the Secret of CURVE keys they mount (the bus is sealed by default)."""
    keys = run_cli("keys", "generate", str(out), "--k8s-secret", "digits-dml-curve")
    assert keys.returncode == 0, keys.stderr
    result = run_cli(
        "k8s", "render", str(CONFIG), *SETS, "--image", "dml-cluster:test", "--engine", engine,
        "--gpus-per-peer", "0", "--out", str(out), *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return load_dir(out)


def run_pods(pods: list, tmp_path: Path, timeout: float = 240) -> None:
    codes = wait_all([start(pod, log_dir=tmp_path) for pod in pods], timeout)
    logs = "\n".join(
        f"== {pod.name}\n{(tmp_path / f'{pod.name}.log').read_text()[-2500:]}" for pod in pods
    )
    assert codes == [0] * len(pods), logs


def test_pytorchjob_env_runs_the_cohort(tmp_path: Path, reference: Path) -> None:
    manifests = render(tmp_path / "manifests", "pytorchjob", "--master-port", str(free_port()))
    name = find(manifests, "PyTorchJob")["metadata"]["name"]
    pods = pytorchjob_pods(manifests, tmp_path / "pods", {f"{name}-master-0": "127.0.0.1"})
    assert len(pods) == 2
    run_pods(pods, tmp_path)
    assert_same_states(tmp_path / "pods" / "workspace" / "runs" / RUN, reference)


def test_indexed_job_env_runs_the_cohort(tmp_path: Path, reference: Path) -> None:
    manifests = render(tmp_path / "manifests", "indexed-job", "--rdzv-port", str(free_port()))
    env = find(manifests, "Job")["spec"]["template"]["spec"]["containers"][0]["env"]
    endpoint = next(e["value"] for e in env if e["name"] == "PET_RDZV_ENDPOINT")
    pods = indexed_job_pods(manifests, tmp_path / "pods", {endpoint.rsplit(":", 1)[0]: "127.0.0.1"})
    assert len(pods) == 2
    run_pods(pods, tmp_path)
    assert_same_states(tmp_path / "pods" / "workspace" / "runs" / RUN, reference)


def test_pytorchjob_lost_peer_exit_code_is_retried(tmp_path: Path) -> None:
    """Only the master starts: it gives up on the missing worker with an exit code that
    `restartPolicy: ExitCode` retries (128-255), not a permanent one."""
    manifests = render(
        tmp_path / "manifests", "pytorchjob", "--master-port", str(free_port()),
        "--set", "bus.timeout_s=3",
    )  # fmt: skip
    name = find(manifests, "PyTorchJob")["metadata"]["name"]
    master = pytorchjob_pods(manifests, tmp_path / "pods", {f"{name}-master-0": "127.0.0.1"})[0]
    (code,) = wait_all([start(master, log_dir=tmp_path)], 120)
    log = (tmp_path / f"{master.name}.log").read_text()
    assert 128 <= code <= 255, (code, log[-3000:])
    assert "Traceback" not in log
