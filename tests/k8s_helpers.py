"""Run rendered Kubernetes manifests' containers as local processes, with the env Kubernetes
and the Kubeflow training operator would give them.

What the cluster adds, and only that, is added here: the training operator's variables for a
PyTorchJob replica (training-operator v1.9, pkg/controller.v1/pytorch/envvar.go and master.go),
what Kubeflow Trainer v2 makes of a TrainJob and its runtime (`as_trainer_would`),
JOB_COMPLETION_INDEX for an Indexed Job pod, kubelet's $(VAR) expansion of command and args, the
volumes (ConfigMap files and the workspace) as folders, and the cluster's DNS names as addresses
(`hosts`). Everything else, command line and env, is the manifest's own.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dml_cluster.k8s.pod import CONFIG_DIR, WORKDIR

from .conftest import REPO, References

VENV_BIN = str(Path(sys.executable).parent)
# the cohort every k8s / multi-node test trains, and the one-process engine's result for it
CONFIG = REPO / "configs" / "digits-dml.yaml"
RUN = "digits-dml"
SETS = ("--set", "train.max_steps=25", "--set", "bus.transport=zmq")


@pytest.fixture(scope="session", name="reference")
def one_process_reference(references: References) -> Path:
    """The one-process engine's run folder for CONFIG + SETS (conftest's session reference)."""
    (run_dir,) = references((str(CONFIG), *SETS[1::2]))
    return run_dir


@dataclass
class Pod:
    """One pod's container, ready to run: argv, env and working directory."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def load_dir(path: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        p.name: list(yaml.safe_load_all(p.read_text(encoding="utf-8")))
        for p in sorted(path.glob("*.yaml"))
    }


def find(manifests: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    docs = [d for docs in manifests.values() for d in docs if d["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind}, found {len(docs)}"
    return docs[0]


def expand(text: str, env: dict[str, str]) -> str:
    """kubelet's $(VAR) expansion: defined variables are replaced, $$ escapes, others stay."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def _mounts(
    manifests: dict[str, list[dict[str, Any]]], root: Path, spec: dict[str, Any]
) -> dict[str, Path]:
    """The pod's volumes as local folders: the ConfigMap's files, a shared workspace, the
    Secrets' files (paths into a Secret's mount in the config name the local folder)."""
    secrets = _secret_mounts(manifests, spec, root)
    config = root / "config"
    config.mkdir(parents=True, exist_ok=True)
    for name, text in find(manifests, "ConfigMap")["data"].items():
        for inside, outside in secrets.items():
            text = text.replace(inside, str(outside))
        (config / name).write_text(text)
    workspace = root / "workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    return {CONFIG_DIR: config, WORKDIR: workspace, **secrets}


def _secret_mounts(
    manifests: dict[str, list[dict[str, Any]]], spec: dict[str, Any], root: Path
) -> dict[str, Path]:
    """The pod's Secret volumes as local folders of the Secret's files (the Secret must be among
    the manifests, as the cluster must hold it)."""
    secrets = {d["metadata"]["name"]: d for docs in manifests.values() for d in docs
               if d["kind"] == "Secret"}  # fmt: skip
    mounts = {}
    (container,) = spec["containers"]
    for volume in spec.get("volumes", []):
        if "secret" not in volume:
            continue
        name = volume["secret"]["secretName"]
        assert name in secrets, f"the pods mount Secret {name}, which is not among the manifests"
        folder = root / f"secret-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for key, data in secrets[name]["data"].items():
            (folder / key).write_bytes(base64.b64decode(data))
        (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"]]
        mounts[path] = folder
    return mounts


def _remap(text: str, mounts: dict[str, Path]) -> str:
    for inside, outside in mounts.items():
        if text == inside or text.startswith(inside + "/"):
            return str(outside) + text[len(inside) :]
    return text


def _pod(
    name: str,
    container: dict[str, Any],
    injected: dict[str, str],
    mounts: dict[str, Path],
    hosts: dict[str, str],
) -> Pod:
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    env.update(injected)  # the operator appends its variables after the manifest's
    for key, value in env.items():
        for host, address in hosts.items():
            value = value.replace(host, address)
        env[key] = _remap(value, mounts)
    argv = [_remap(expand(a, env), mounts) for a in container["command"] + container["args"]]
    env["PATH"] = f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"
    if os.environ.get("PYTHONPATH"):  # the checkout under test, as the image would hold it
        env["PYTHONPATH"] = ":".join(
            filter(None, (os.environ["PYTHONPATH"], env.get("PYTHONPATH")))
        )
    return Pod(name, argv, env, mounts[container["workingDir"]])


def pytorchjob_pods(
    manifests: dict[str, list[dict[str, Any]]], root: Path, hosts: dict[str, str]
) -> list[Pod]:
    """Master then workers, each with what the training operator injects (v1.9)."""
    job = find(manifests, "PyTorchJob")
    name, specs = job["metadata"]["name"], job["spec"]["pytorchReplicaSpecs"]
    total = sum(s["replicas"] for s in specs.values())
    nproc = job["spec"].get("nprocPerNode", "auto")
    world = total * (int(nproc) if nproc.isdigit() else 1)
    mounts = _mounts(manifests, root, specs["Master"]["template"]["spec"])
    pods = []
    for kind in ("Master", "Worker"):
        spec = specs.get(kind)
        if spec is None:
            continue
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch", "the training operator needs the name 'pytorch'"
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port"]
        for index in range(spec["replicas"]):
            rank = index + (1 if kind == "Worker" else 0)
            injected = {
                "PYTHONUNBUFFERED": "0",
                "MASTER_PORT": str(port),
                "MASTER_ADDR": f"{name}-master-0",
                "PET_MASTER_PORT": str(port),
                "PET_MASTER_ADDR": f"{name}-master-0",
                "WORLD_SIZE": str(world),
                "RANK": str(rank),
                "PET_NPROC_PER_NODE": nproc,
                "PET_NODE_RANK": str(rank),
                "PET_NNODES": str(total),
            }
            pods.append(_pod(f"{name}-{kind.lower()}-{index}", container, injected, mounts, hosts))
    return pods


def indexed_job_pods(
    manifests: dict[str, list[dict[str, Any]]], root: Path, hosts: dict[str, str]
) -> list[Pod]:
    """Pod i of the Indexed Job, with the JOB_COMPLETION_INDEX the Job controller sets."""
    job = find(manifests, "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    mounts = _mounts(manifests, root, job["spec"]["template"]["spec"])
    name = job["metadata"]["name"]
    return [
        _pod(f"{name}-{i}", container, {"JOB_COMPLETION_INDEX": str(i)}, mounts, hosts)
        for i in range(job["spec"]["completions"])
    ]


def start(pod: Pod, wrap: list[str] | None = None, log_dir: Path | None = None) -> subprocess.Popen:
    """Start the pod's container command (inside `wrap`, e.g. a network namespace); its output
    goes to <log_dir>/<pod>.log."""
    with open((log_dir or pod.cwd) / f"{pod.name}.log", "w") as log:
        return subprocess.Popen(
            [*(wrap or []), *pod.argv],
            env=pod.env,
            cwd=pod.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of every process; on timeout every process group is killed and it fails."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the pods did not finish within {timeout:g} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [proc.returncode for proc in procs]


# -- Kubeflow Trainer v2: what its controller makes of a TrainJob and its TrainingRuntime ---------

COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
TRAINER_PORT = 29400  # the Trainer's PET_MASTER_PORT (pkg/constants ContainerTrainerPort)


def as_trainer_would(runtime: dict[str, Any], trainjob: dict[str, Any]) -> dict[str, Any]:
    """The JobSet the Trainer (v2.3) makes of a TrainingRuntime and a TrainJob that sets
    numProcPerNode: the runtime's JobSet template; the trainer step's Job sized to numNodes; its
    container `node` with the TrainJob's image, command, args, resourcesPerNode, its env upserted
    and then the torch plugin's PET_* variables upserted, and the trainer port declared
    (pkg/runtime/framework/plugins/torch/torch.go, jobset plugin); suspend and labels from the
    TrainJob."""
    trainer = trainjob["spec"]["trainer"]
    name = trainjob["metadata"]["name"]
    spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
    ancestor = "trainer.kubeflow.org/trainjob-ancestor-step"
    (step,) = [r for r in spec["replicatedJobs"]
               if r["template"]["metadata"]["labels"].get(ancestor) == "trainer"]  # fmt: skip
    job_spec = step["template"]["spec"]
    job_spec["completions"] = job_spec["parallelism"] = trainer["numNodes"]
    (main,) = [c for c in job_spec["template"]["spec"]["containers"] if c["name"] == "node"]
    main.update(image=trainer["image"], command=trainer["command"], args=trainer["args"])
    main["resources"] = trainer["resourcesPerNode"]
    env = {e["name"]: e for e in main.get("env", [])}
    pet = [
        {"name": "PET_NNODES", "value": str(trainer["numNodes"])},
        {"name": "PET_NPROC_PER_NODE", "value": str(trainer["numProcPerNode"])},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
    ]
    for var in [*trainer.get("env", []), *pet]:
        env[var["name"]] = var
    main["env"] = list(env.values())
    main["ports"] = [*main["ports"], {"containerPort": TRAINER_PORT, "protocol": "TCP"}]
    if trainjob["spec"].get("suspend"):
        spec = {"suspend": True, **spec}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": trainjob["metadata"],
        "spec": spec,
    }


def jobset_pods(
    manifests: dict[str, list[dict[str, Any]]],
    jobset: dict[str, Any],
    root: Path,
    hosts: dict[str, str],
    env: dict[str, str] | None = None,
) -> list[Pod]:
    """Pod i of the JobSet's one replicated job: its completion index as the Job controller
    gives it (the annotation the PET_NODE_RANK fieldRef reads, JOB_COMPLETION_INDEX); `env`
    replaces values (a free port for the one a pod has to itself on a cluster)."""
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job_spec = replicated["template"]["spec"]
    assert job_spec["completionMode"] == "Indexed"
    spec = job_spec["template"]["spec"]
    (container,) = spec["containers"]
    mounts = _mounts(manifests, root, spec)
    name = jobset["metadata"]["name"]
    pods = []
    for i in range(job_spec["completions"]):
        resolved = []
        for var in container["env"]:
            if "valueFrom" in var:
                assert var["valueFrom"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}, var
                var = {"name": var["name"], "value": str(i)}
            resolved.append({**var, "value": (env or {}).get(var["name"], var["value"])})
        pod = {**container, "env": resolved}
        injected = {"JOB_COMPLETION_INDEX": str(i)}
        pods.append(_pod(f"{name}-{replicated['name']}-0-{i}", pod, injected, mounts, hosts))
    return pods
