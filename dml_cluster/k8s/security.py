"""What seals a cohort's deployment: a NetworkPolicy, CURVE keys from a Secret, and the time a
preempted pod gets to save.

- NetworkPolicy (ingress): the job's peer pods reach each other (the rendezvous store, the zmq
  inboxes and gloo's process-group connections, which use ephemeral ports, so every port
  between peers); Prometheus's pods, in their namespace, reach the metrics port; nothing else
  gets in.
- CURVE: on by default for a zmq cohort of more than one peer. The keys are a Secret (make one
  with `dml-cluster keys generate DIR --k8s-secret NAME`, or name an existing one) mounted at
  CURVE_DIR, and the shipped config's bus.curve_keys points there.
- terminationGracePeriodSeconds: checkpoint.on_signal.grace_s plus EXIT_MARGIN_S, so that the
  kubelet's SIGKILL never cuts the save a SIGTERM starts.
"""

from __future__ import annotations

import base64
import math
import os
from pathlib import Path
from typing import Any

import yaml

from dml_cluster.config import Config
from dml_cluster.errors import ConfigError
from dml_cluster.k8s.meta import Job
from dml_cluster.k8s.options import RenderOptions
from dml_cluster.k8s.pod import metrics_port

CURVE_DIR = "/etc/dml-cluster-curve"
CURVE_VOLUME = "curve-keys"
EXIT_MARGIN_S = 15  # after the save: leaving the process group, interpreter shutdown
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace (Kubernetes 1.21+)


def curve_secret(job: Job) -> str | None:
    """The Secret holding the cohort's CURVE keys, or None when the bus is not sealed: off by
    --no-curve, the torch transport (no CURVE), or a cohort of one peer (nothing to reach)."""
    opts = job.opts
    if not opts.curve:
        return None
    if job.cfg.bus.transport != "zmq":
        if opts.curve_secret is not None:
            raise ConfigError(
                f"k8s render: --curve-secret: CURVE encrypts the zmq bus; bus.transport is "
                f"{job.cfg.bus.transport!r} (use zmq, or leave --curve-secret out)"
            )
        return None
    if job.size < 2 and opts.curve_secret is None:
        return None
    return opts.curve_secret or f"{job.name}-curve"


def sealed_config(raw: dict[str, Any], secret: str | None) -> dict[str, Any]:
    """The shipped config: bus.curve_keys at the Secret's mount (a local path means nothing in
    a pod)."""
    if secret is None:
        return raw
    return {**raw, "bus": {**(raw.get("bus") or {}), "curve_keys": CURVE_DIR}}


def curve_volume(secret: str) -> dict[str, Any]:
    # owner and group (the pod's fsGroup) may read the keys, nobody else
    return {"name": CURVE_VOLUME, "secret": {"secretName": secret, "defaultMode": 0o440}}


def curve_mount() -> dict[str, Any]:
    return {"name": CURVE_VOLUME, "mountPath": CURVE_DIR, "readOnly": True}


def seal_pod(job: Job, spec: dict[str, Any]) -> dict[str, Any]:
    """A peer pod's spec with the grace period of a preemption save and the CURVE keys."""
    spec = {"terminationGracePeriodSeconds": termination_grace_s(job.cfg), **spec}
    secret = curve_secret(job)
    if secret is not None:
        (main,) = spec["containers"]
        spec["containers"] = [{**main, "volumeMounts": [*main["volumeMounts"], curve_mount()]}]
        spec["volumes"] = [*spec["volumes"], curve_volume(secret)]
    return spec


def termination_grace_s(cfg: Config) -> int:
    """The pods' terminationGracePeriodSeconds: the cohort's save grace and a margin to exit."""
    return math.ceil(cfg.checkpoint.on_signal.grace_s) + EXIT_MARGIN_S


def network_policy(job: Job) -> dict[str, Any]:
    """Ingress of the job's peer pods: from each other, and Prometheus to the metrics port."""
    peers = {"podSelector": {"matchLabels": job.selector()}}
    ingress: list[dict[str, Any]] = [{"from": [peers]}]
    port = metrics_port(job.cfg)
    if port is not None:
        prometheus = {
            "namespaceSelector": {
                "matchLabels": {NAMESPACE_NAME_LABEL: job.opts.prometheus_namespace}
            },
            "podSelector": {"matchLabels": dict(job.opts.prometheus_labels)},
        }
        ingress.append({"from": [prometheus], "ports": [{"protocol": "TCP", "port": port}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": job.metadata(job.name, "network-policy"),
        "spec": {
            "podSelector": {"matchLabels": job.selector()},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def curve_secret_manifest(name: str, namespace: str, files: dict[str, bytes]) -> dict[str, Any]:
    """A Secret holding the key files by name, to mount at CURVE_DIR."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "dml-cluster"},
        },
        "type": "Opaque",
        "data": {key: base64.b64encode(data).decode() for key, data in sorted(files.items())},
    }


def write_curve_secret(folder: str | Path, name: str, namespace: str) -> Path:
    """FOLDER/NAME.yaml: a Secret of every CURVE key file in FOLDER (readable by its owner
    only), for `kubectl apply -f` and `k8s render --curve-secret NAME`."""
    RenderOptions(image="-", namespace=namespace, curve_secret=name).check()  # the names
    folder = Path(folder)
    files = {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in (".key", ".key_secret")
    }
    path = folder / f"{name}.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yaml.safe_dump(curve_secret_manifest(name, namespace, files), out, sort_keys=False)
    return path


def mounted_secrets(files: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The Secrets the rendered pods mount (the cluster must hold them before the job starts)."""
    names: list[str] = []
    for docs in files.values():
        for doc in docs:
            for template in _pod_templates(doc):
                for volume in template["spec"].get("volumes", []):
                    if "secret" in volume and volume["secret"]["secretName"] not in names:
                        names.append(volume["secret"]["secretName"])
    return names


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") == "PyTorchJob":
        return [s["template"] for s in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc.get("kind") == "Job":
        return [doc["spec"]["template"]]
    return []
