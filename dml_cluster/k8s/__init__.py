"""Kubernetes manifests for a cohort, rendered from its experiment config (`dml-cluster k8s
render`): a Kubeflow PyTorchJob or an Indexed Job + headless Service, the config as a ConfigMap,
a PodMonitor / ServiceMonitor for Prometheus, and Grafana's dashboard. Pure data: nothing here
talks to a cluster."""

from dml_cluster.k8s.options import RenderOptions, job_name, parse_labels
from dml_cluster.k8s.render import Manifests, pod_config, render, stream, write

__all__ = [
    "Manifests",
    "RenderOptions",
    "job_name",
    "parse_labels",
    "pod_config",
    "render",
    "stream",
    "write",
]
