"""Names and labels shared by every rendered resource of one job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dml_cluster.config import Config
from dml_cluster.k8s.data import DataPlacement
from dml_cluster.k8s.options import RenderOptions

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


@dataclass(frozen=True)
class Job:
    """One rendered job: its name, config and deployment options."""

    name: str
    cfg: Config
    opts: RenderOptions
    data: DataPlacement = field(default_factory=DataPlacement)

    @property
    def size(self) -> int:
        """The pods (one process each): K peers x D replicas (cohort.replicas), ranks
        peer-major, so pod i is replica i % D of peer i // D."""
        return len(self.cfg.peers) * self.cfg.cohort.replicas

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"

    def selector(self) -> dict[str, str]:
        """The labels that pick this job's peer pods (Services, PodMonitor)."""
        return {"app.kubernetes.io/name": "dml-cluster", "app.kubernetes.io/instance": self.name}

    def labels(self, component: str) -> dict[str, str]:
        return {
            **self.opts.labels,
            **self.selector(),
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "dml-cluster",
            "dml-cluster/config-hash": self.cfg.hash(),
        }

    @property
    def queued(self) -> bool:
        """Kueue admits the workload: it is rendered suspended, and Kueue unsuspends it."""
        return self.opts.queue is not None

    def workload_metadata(self) -> dict[str, Any]:
        """The metadata of the object Kueue admits (TrainJob, JobSet, Job, PyTorchJob): its
        queue and priority class as Kueue's labels."""
        kueue = {}
        if self.opts.queue:
            kueue[QUEUE_LABEL] = self.opts.queue
        if self.opts.priority_class:
            kueue[PRIORITY_LABEL] = self.opts.priority_class
        return self.metadata(self.name, "job", labels=kueue)

    def metadata(self, name: str, component: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.opts.namespace,
            "labels": {**self.labels(component), **extra.pop("labels", {})},
            **extra,
        }
