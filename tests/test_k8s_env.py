"""The env each manifest gives its container is the env torchrun and the trainer read.

`dml-cluster k8s render` writes the manifests; every pod's command line then runs as a local
process with the manifest's env plus what the cluster adds (tests/k8s_helpers.py), the cluster's
DNS names pointing at 127.0.0.1. The cohort must finish with the one-process engine's weights.
(tests/test_multinode_netns.py runs the Indexed Job's pods on two real network hosts.)
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from .conftest import assert_same_states, run_cli
from .k8s_helpers import (
    CONFIG,
    RUN,
    SETS,
    TRAINER_PORT,
    as_trainer_would,
    find,
    indexed_job_pods,
    jobset_pods,
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


def render_here(out: Path, engine: str, **options: Any) -> dict:
    """What `render` writes (the CLI's steps, in this process), with the CURVE keys' Secret."""
    from dml_cluster.bus.curve import generate_keys
    from dml_cluster.k8s import RenderOptions, pod_config, write
    from dml_cluster.k8s import render as render_manifests
    from dml_cluster.k8s.security import write_curve_secret

    generate_keys(out)
    write_curve_secret(out, "digits-dml-curve", "default")
    cfg, raw = pod_config(CONFIG, list(SETS[1::2]))
    opts = RenderOptions(image="dml-cluster:test", engine=engine, gpus_per_peer=0, **options)
    write(render_manifests(cfg, raw, opts), out)
    return load_dir(out)


def test_trainjob_and_pytorchjob_envs_run_their_cohorts(tmp_path: Path, reference: Path) -> None:
    """Two cohorts at once, each pod a local process:

    - the TrainJob as the Kubeflow Trainer runs it: the JobSet it makes of the TrainJob and the
      rendered TrainingRuntime (the torch plugin's PET_* variables, PET_NODE_RANK from the pod's
      completion index), each pod's `dml-cluster train` started without torchrun; PET_MASTER_PORT,
      a port pod 0 has to itself on a cluster, is a free one here (the JobSet engine renders the
      same pods: test_k8s_manifests);
    - the (deprecated) PyTorchJob with the training operator's variables.

    Both finish with the one-process engine's weights."""
    trainjob = render_here(tmp_path / "trainjob", "trainjob")
    jobset = as_trainer_would(*trainjob["trainjob.yaml"])
    name = jobset["metadata"]["name"]
    port = {"PET_MASTER_PORT": str(free_port())}
    pods = jobset_pods(
        trainjob, jobset, tmp_path / "trainjob-pods", {f"{name}-node-0-0.{name}": "127.0.0.1"}, port
    )
    assert len(pods) == 2 and pods[1].env["PET_NODE_RANK"] == "1"
    assert pods[0].argv[:2] == ["dml-cluster", "train"]
    assert int(port["PET_MASTER_PORT"]) != TRAINER_PORT
    pytorchjob = render_here(tmp_path / "pytorchjob", "pytorchjob", master_port=free_port())
    master = f"{find(pytorchjob, 'PyTorchJob')['metadata']['name']}-master-0"
    operator_pods = pytorchjob_pods(pytorchjob, tmp_path / "pytorchjob-pods", {master: "127.0.0.1"})
    for pod in operator_pods:
        pod.name = f"pytorchjob-{pod.name}"
    assert len(operator_pods) == 2
    run_pods([*pods, *operator_pods], tmp_path)
    for root in ("trainjob-pods", "pytorchjob-pods"):
        assert_same_states(tmp_path / root / "workspace" / "runs" / RUN, reference)


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
        "--set", "bus.timeout_s=3", "--set", "bus.startup_timeout_s=3",
    )  # fmt: skip
    name = find(manifests, "PyTorchJob")["metadata"]["name"]
    master = pytorchjob_pods(manifests, tmp_path / "pods", {f"{name}-master-0": "127.0.0.1"})[0]
    (code,) = wait_all([start(master, log_dir=tmp_path)], 120)
    log = (tmp_path / f"{master.name}.log").read_text()
    assert 128 <= code <= 255, (code, log[-3000:])
    assert "Traceback" not in log


def test_the_trainers_pet_variables_are_adopted_only_for_one_process_per_node() -> None:
    """`dml-cluster train` reads the Trainer's PET_* as torch's env:// variables; never under a
    launcher that set RANK (torchrun in the Indexed Job's pods), never without them; a node of
    several processes is one line (it needs torchrun)."""
    from dml_cluster.errors import ConfigError
    from dml_cluster.launch import adopt_torch_runtime_env

    pet = {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "2",
           "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}  # fmt: skip
    env = dict(pet)
    assert adopt_torch_runtime_env(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "job-node-0-0.job", "MASTER_PORT": "29400"
    }  # fmt: skip
    under_torchrun = {**pet, "RANK": "0", "WORLD_SIZE": "3"}
    assert not adopt_torch_runtime_env(under_torchrun) and under_torchrun["RANK"] == "0"
    assert not adopt_torch_runtime_env({"PET_NNODES": "3"})
    with pytest.raises(ConfigError, match="PET_NPROC_PER_NODE=2: .* needs torchrun"):
        adopt_torch_runtime_env({**pet, "PET_NPROC_PER_NODE": "2"})
