"""What a deployment adds to an experiment config: image, namespace, GPUs, engine, monitoring.

The experiment config says what to train (cohort size, models, data); `RenderOptions` says where
and how it runs on Kubernetes. Names are checked here so that a bad one is one clear error, not a
manifest the API server rejects later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from dml_cluster.errors import ConfigError

Engine = Literal["trainjob", "jobset", "indexed-job", "pytorchjob"]
Monitor = Literal["pod", "service", "none"]

# trainjob: Kubeflow Trainer v2; jobset: the JobSet the Trainer would make, without it;
# indexed-job: plain Kubernetes; pytorchjob: Training Operator v1 (deprecated)
ENGINES: tuple[str, ...] = ("trainjob", "jobset", "indexed-job", "pytorchjob")
DEFAULT_DATA_MOUNT = "/data"
MONITORS: tuple[str, ...] = ("pod", "service", "none")

# room for the longest suffix a name gets ("-worker-NNN", "-metrics") within 63 characters
MAX_NAME = 45
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


@dataclass(frozen=True)
class RenderOptions:
    """Deployment settings for `dml-cluster k8s render` (see k8s/README.md)."""

    image: str
    engine: Engine = "trainjob"
    namespace: str = "default"
    name: str | None = None
    gpus_per_peer: int = 1
    cpu: str | None = None
    memory: str = "4Gi"
    pvc: str | None = None
    monitor: Monitor = "pod"
    monitor_labels: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    dashboard: str | None = None
    backoff_limit: int = 3
    max_restarts: int = 3
    master_port: int = 23456
    rdzv_port: int = 29400
    cluster_domain: str = "cluster.local"
    curve: bool = True  # seal the zmq bus of a multi-peer cohort with CURVE keys from a Secret
    curve_secret: str | None = None  # default: <job>-curve
    prometheus_namespace: str = "monitoring"  # the NetworkPolicy lets its Prometheus scrape
    prometheus_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"}
    )
    runtime: str | None = None  # trainjob: the TrainingRuntime's name (default: the job's)
    queue: str | None = None  # Kueue LocalQueue: the workload is queued and starts suspended
    priority_class: str | None = None  # Kueue WorkloadPriorityClass
    data_pvc: str | None = None  # a claim holding the user's data, mounted read-only
    data_pvc_mount: str = DEFAULT_DATA_MOUNT
    data_host_path: str | None = None  # a node folder holding the data (single-node clusters)
    data_host_mount: str = DEFAULT_DATA_MOUNT
    data_in_image: str | None = None  # a folder of the image the data was baked into

    def check(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError(f"k8s render: --image {self.image!r} is not an image reference")
        if self.engine not in ENGINES:
            raise ConfigError(f"k8s render: --engine must be one of {', '.join(ENGINES)}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"k8s render: --monitor must be one of {', '.join(MONITORS)}")
        for what, namespace in (("--namespace", self.namespace),
                                ("--prometheus-namespace", self.prometheus_namespace)):  # fmt: skip
            if not _DNS_LABEL.match(namespace) or len(namespace) > 63:
                raise ConfigError(
                    f"k8s render: {what} {namespace!r} is not a valid namespace "
                    "(lower-case letters, digits and '-', starting with a letter)"
                )
        if self.curve_secret is not None and (
            not _DNS_SUBDOMAIN.match(self.curve_secret) or len(self.curve_secret) > 253
        ):
            raise ConfigError(
                f"k8s render: --curve-secret {self.curve_secret!r} is not a valid Secret name "
                "(lower-case letters, digits, '-' and '.')"
            )
        if self.curve_secret is not None and not self.curve:
            raise ConfigError("k8s render: --curve-secret and --no-curve contradict each other")
        if self.name is not None:
            check_name(self.name, "--name")
        if self.runtime is not None:
            check_name(self.runtime, "--runtime")
        for what, value in (("--queue", self.queue), ("--priority-class", self.priority_class),
                            ("--data-pvc", self.data_pvc)):  # fmt: skip
            if value is not None and (not _DNS_SUBDOMAIN.match(value) or len(value) > 63):
                raise ConfigError(
                    f"k8s render: {what} {value!r} is not a valid name "
                    "(lower-case letters, digits, '-' and '.', at most 63 characters)"
                )
        self._check_data()
        for what, value in (("--gpus-per-peer", self.gpus_per_peer),
                            ("--backoff-limit", self.backoff_limit),
                            ("--max-restarts", self.max_restarts)):  # fmt: skip
            if value < 0:
                raise ConfigError(f"k8s render: {what} must be 0 or more (got {value})")
        for what, port in (("--master-port", self.master_port), ("--rdzv-port", self.rdzv_port)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"k8s render: {what} must be a port 1-65535 (got {port})")
        for what, labels in (("--label", self.labels), ("--monitor-label", self.monitor_labels),
                             ("--prometheus-label", self.prometheus_labels)):  # fmt: skip
            for key, value in labels.items():
                if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value) or len(value) > 63:
                    raise ConfigError(f"k8s render: {what} {key}={value}: not a valid label")

    def _check_data(self) -> None:
        given = [w for w, v in (("--data-pvc", self.data_pvc),
                                ("--data-host-path", self.data_host_path),
                                ("--data-in-image", self.data_in_image)) if v]  # fmt: skip
        if len(given) > 1:
            raise ConfigError(f"k8s render: give one of {' and '.join(given)}, not both")
        for what, path in (("--data-pvc mount", self.data_pvc_mount),
                           ("--data-host-path mount", self.data_host_mount),
                           ("--data-host-path", self.data_host_path or "/"),
                           ("--data-in-image", self.data_in_image or "/")):  # fmt: skip
            if not path.startswith("/") or ":" in path or any(c.isspace() for c in path):
                raise ConfigError(f"k8s render: {what} {path!r} must be an absolute path")
        for what, mount in (("--data-pvc", self.data_pvc_mount),
                            ("--data-host-path", self.data_host_mount)):  # fmt: skip
            if mount.rstrip("/") in RESERVED_MOUNTS or mount == "/":
                raise ConfigError(
                    f"k8s render: {what}: {mount} is taken (the pods use "
                    f"{', '.join(RESERVED_MOUNTS)}); mount the data elsewhere"
                )


# the pods' own mounts (pod.py, security.py): the data cannot go there
RESERVED_MOUNTS = ("/etc/dml-cluster", "/etc/dml-cluster-curve", "/workspace", "/tmp", "/dev/shm")


def split_mount(value: str, what: str) -> tuple[str, str]:
    """`NAME[:MOUNT]` -> (NAME, MOUNT), MOUNT defaulting to /data."""
    name, sep, mount = value.partition(":")
    if not name or (sep and not mount):
        raise ConfigError(f"k8s render: {what} {value!r}: expected NAME[:MOUNT]")
    return name, mount or DEFAULT_DATA_MOUNT


def check_name(name: str, what: str) -> str:
    if len(name) > MAX_NAME or not _DNS_LABEL.match(name):
        raise ConfigError(
            f"k8s render: {what} {name!r} is not a valid job name (lower-case letters, digits "
            f"and '-', starting with a letter, at most {MAX_NAME} characters)"
        )
    return name


def job_name(run_name: str) -> str:
    """A DNS-1035 label from the config's run.name: `digits_DML.v2` -> `digits-dml-v2`."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"dml-{name}".rstrip("-")
    return name[:MAX_NAME].rstrip("-")


def parse_labels(items: tuple[str, ...] | list[str], what: str) -> dict[str, str]:
    """`KEY=VALUE` strings (from repeated CLI options) as a dict."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"k8s render: {what} {item!r}: expected KEY=VALUE")
        labels[key] = value
    return labels
