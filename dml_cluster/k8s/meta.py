"""Names and labels shared by every rendered resource of one job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dml_cluster.config import Config
from dml_cluster.k8s.options import RenderOptions


@dataclass(frozen=True)
class Job:
    """One rendered job: its name, config and deployment options."""

    name: str
    cfg: Config
    opts: RenderOptions

    @property
    def size(self) -> int:
        return len(self.cfg.peers)

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

    def metadata(self, name: str, component: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.opts.namespace,
            "labels": {**self.labels(component), **extra.pop("labels", {})},
            **extra,
        }
