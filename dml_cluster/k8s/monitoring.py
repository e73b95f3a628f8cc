"""How Prometheus (the Prometheus Operator) finds the peers: a PodMonitor, or a Service with a
ServiceMonitor, selecting the job's pods by label and scraping their `metrics` port. And the
Grafana dashboard as a ConfigMap that Grafana's dashboard sidecar loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dml_cluster.errors import ConfigError
from dml_cluster.k8s.meta import Job

SCRAPE_INTERVAL = "15s"
DASHBOARD_CONFIG_MAP = "dml-cluster-dashboard"


def _endpoint() -> dict[str, Any]:
    return {"port": "metrics", "path": "/metrics", "interval": SCRAPE_INTERVAL}


def pod_monitor(job: Job) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": job.metadata(job.name, "monitoring", labels=dict(job.opts.monitor_labels)),
        "spec": {
            "selector": {"matchLabels": job.selector()},
            "podMetricsEndpoints": [_endpoint()],
            "podTargetLabels": ["app.kubernetes.io/instance"],
        },
    }


def metrics_service(job: Job, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": job.metadata(f"{job.name}-metrics", "metrics"),
        "spec": {
            "clusterIP": "None",
            "selector": job.selector(),
            "ports": [{"name": "metrics", "port": port, "targetPort": "metrics"}],
        },
    }


def service_monitor(job: Job) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": job.metadata(job.name, "monitoring", labels=dict(job.opts.monitor_labels)),
        "spec": {
            "selector": {
                "matchLabels": {**job.selector(), "app.kubernetes.io/component": "metrics"}
            },
            "endpoints": [_endpoint()],
            "podTargetLabels": ["app.kubernetes.io/instance"],
        },
    }


def dashboard_config_map(job: Job, path: str) -> dict[str, Any]:
    """One ConfigMap for every job (the dashboard picks the run by variable); the label is the
    default of the Grafana Helm chart's dashboard sidecar."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        json.loads(text)
    except OSError as err:
        raise ConfigError(f"k8s render: --dashboard {path}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"k8s render: --dashboard {path}: not JSON ({err.msg})") from None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": DASHBOARD_CONFIG_MAP,
            "namespace": job.opts.namespace,
            "labels": {
                "app.kubernetes.io/name": "dml-cluster",
                "app.kubernetes.io/component": "dashboard",
                "grafana_dashboard": "1",
            },
        },
        "data": {f"{DASHBOARD_CONFIG_MAP}.json": text},
    }
