"""The pod every peer runs in: one container `pytorch`, one peer, its GPUs, its volumes.

The experiment config is mounted from a ConfigMap at CONFIG_PATH; run folders go to WORKDIR (an
emptyDir, or a PersistentVolumeClaim shared by the cohort so checkpoints survive a pod). The root
filesystem is read-only and the process runs as the image's non-root user.
"""

from __future__ import annotations

import sys
from typing import Any

from dml_cluster.config import Config
from dml_cluster.errors import ConfigError
from dml_cluster.k8s.options import RenderOptions

CONFIG_DIR = "/etc/dml-cluster"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
WORKDIR = "/workspace"
RUN_OUT_DIR = "runs"  # the pods' run.out_dir, relative to WORKDIR (the workspace volume)
USER_ID = 10001  # the Dockerfile's user
CONTAINER = "pytorch"  # the name the Kubeflow training operator requires
DEFAULT_METRICS_PORT = 9400
EVERY_INTERFACE = ("0.0.0.0", "::", "")  # metrics.address values that bind every interface
GPU = "nvidia.com/gpu"


def metrics_port(cfg: Config) -> int | None:
    """The port each peer's Prometheus endpoint listens on in its pod (one peer per pod, so
    local rank 0: the configured base port itself); None when metrics are off."""
    metrics = getattr(cfg, "metrics", None)
    if metrics is None:
        # a config model without a metrics section: declare the exporter's default port
        print(
            f"dml-cluster: note: the config has no metrics section; declaring the default "
            f"metrics port {DEFAULT_METRICS_PORT}",
            file=sys.stderr,
        )
        return DEFAULT_METRICS_PORT
    if not metrics.enabled:
        return None
    if metrics.port == 0:
        raise ConfigError(
            "config error: metrics.port: 0 (any free port) cannot be scraped in Kubernetes; "
            f"set a fixed port (e.g. --set metrics.port={DEFAULT_METRICS_PORT})"
        )
    if metrics.address not in EVERY_INTERFACE:
        raise ConfigError(
            f"config error: metrics.address: {metrics.address} cannot be scraped in Kubernetes: "
            "Prometheus scrapes the pod's IP, given when the pod starts; bind every interface "
            "(the default 0.0.0.0, or ::)"
        )
    return int(metrics.port)


def bus_port(cfg: Config) -> int | None:
    """The zmq inbox port when the config fixes one (local rank 0 in a one-peer pod)."""
    if cfg.bus.transport != "zmq":
        return None
    port = getattr(cfg.bus, "port", None)
    return int(port) if port else None


def ports(cfg: Config, extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    declared = list(extra)
    if (port := metrics_port(cfg)) is not None:
        declared.append({"name": "metrics", "containerPort": port, "protocol": "TCP"})
    if (port := bus_port(cfg)) is not None:
        declared.append({"name": "bus", "containerPort": port, "protocol": "TCP"})
    return declared


def _resources(cfg: Config, opts: RenderOptions) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": opts.cpu or str(cfg.run.threads), "memory": opts.memory}
    limits: dict[str, Any] = {"memory": opts.memory}
    if opts.gpus_per_peer:
        requests[GPU] = opts.gpus_per_peer
        limits[GPU] = opts.gpus_per_peer
    return {"requests": requests, "limits": limits}


def base_env(cfg: Config) -> list[dict[str, str]]:
    """What every peer container gets, whichever engine starts it."""
    return [
        {"name": "OMP_NUM_THREADS", "value": str(cfg.run.threads)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
    ]


def container(
    cfg: Config,
    opts: RenderOptions,
    *,
    command: list[str],
    args: list[str],
    env: list[dict[str, str]],
    extra_ports: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "name": CONTAINER,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "workingDir": WORKDIR,
        "env": env,
        "ports": ports(cfg, extra_ports),
        "resources": _resources(cfg, opts),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "workspace", "mountPath": WORKDIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }


def volumes(config_map: str, opts: RenderOptions) -> list[dict[str, Any]]:
    workspace: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": opts.pvc}} if opts.pvc else {"emptyDir": {}}
    )
    return [
        {"name": "config", "configMap": {"name": config_map}},
        {"name": "workspace", **workspace},
        {"name": "tmp", "emptyDir": {}},
        # torch's shared-memory tensors and NCCL need more than the runtime's 64 MiB default
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]


def pod_spec(
    opts: RenderOptions, config_map: str, main: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        **extra,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "fsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [main],
        "volumes": volumes(config_map, opts),
    }
    if opts.gpus_per_peer:
        spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return spec
