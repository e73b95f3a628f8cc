"""`dml-cluster k8s render`: the Kubernetes manifests of one experiment, from its config.

One source of truth: the cohort size, the peers and the metrics port come from the experiment
config, which travels with the job as a ConfigMap; the deployment options add image, namespace,
GPUs and the engine. The output folder is also a kustomize base (`kubectl apply -k DIR`).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from dml_cluster.config import Config, apply_overrides, load_config, parse_config
from dml_cluster.errors import ConfigError
from dml_cluster.k8s.data import place_data
from dml_cluster.k8s.jobset import jobset, train_job, training_runtime
from dml_cluster.k8s.meta import Job
from dml_cluster.k8s.monitoring import (
    dashboard_config_map,
    metrics_service,
    pod_monitor,
    service_monitor,
)
from dml_cluster.k8s.options import RenderOptions, check_name, job_name
from dml_cluster.k8s.pod import RUN_OUT_DIR, metrics_port
from dml_cluster.k8s.security import curve_secret, network_policy, sealed_config
from dml_cluster.k8s.workloads import headless_service, indexed_job, pytorchjob

Manifests = dict[str, list[dict[str, Any]]]  # file name -> its YAML documents

HEADER = (
    "# Rendered by `dml-cluster k8s render` from an experiment config: change the config or the\n"
    "# render options and render again rather than editing this file.\n"
)


def pod_config(path: str | Path, overrides: list[str]) -> tuple[Config, dict[str, Any]]:
    """The experiment config with its overrides applied, checked for a cluster. Returns the
    validated config and the plain dict that `render` ships (with the run folders moved into
    the pod's workspace and the paths to the user's data placed)."""
    load_config(path, overrides)  # every config problem is reported here, as for `train`
    raw = apply_overrides(yaml.safe_load(Path(path).read_text()) or {}, overrides)
    cfg = parse_config(raw)
    if cfg.bus.transport == "local":
        raise ConfigError(
            "k8s render: bus.transport is 'local' (every peer in one process); a cohort on "
            "Kubernetes runs one pod per peer: add --set bus.transport=zmq (or torch)"
        )
    if cfg.bus.ipc:
        raise ConfigError("k8s render: bus.ipc works on one node only; peers run in separate pods")
    return cfg, raw


def gpu_warnings(cfg: Config, opts: RenderOptions) -> list[str]:
    """A config that runs on CUDA (cohort.devices, fp16) rendered without a GPU request: the
    pods would get none (and a Trainer v2 node without one gets its process count from CPUs)."""
    if opts.gpus_per_peer:
        return []
    wants = [d for d in cfg.cohort.devices or [] if d.startswith("cuda")]
    why = f"cohort.devices names {wants[0]}" if wants else ""
    if not why and cfg.run.precision == "fp16":
        why = "run.precision is fp16 (CUDA only)"
    if not why:
        return []
    return [f"{why}, but --gpus-per-peer 0 requests no nvidia.com/gpu: the pods get no GPU"]


def config_map(job: Job, raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": job.metadata(job.config_map, "config"),
        "data": {"config.yaml": yaml.safe_dump(raw, sort_keys=False)},
    }


def render(cfg: Config, raw: dict[str, Any], opts: RenderOptions) -> Manifests:
    """Every manifest of the job, by file name; see k8s/README.md for what each one is."""
    opts.check()
    name = check_name(opts.name, "--name") if opts.name else job_name(cfg.run.name)
    raw = copy.deepcopy(raw)
    raw["run"] = {**(raw.get("run") or {}), "out_dir": RUN_OUT_DIR}
    data = place_data(raw, opts, cfg.run.out_dir)
    job = Job(name, cfg, opts, data)
    for line in [*data.warnings, *gpu_warnings(cfg, opts)]:
        print(f"dml-cluster: warning: k8s render: {line}", file=sys.stderr)
    files: Manifests = {"configmap.yaml": [config_map(job, sealed_config(raw, curve_secret(job)))]}
    if opts.engine == "trainjob":
        files["trainjob.yaml"] = [training_runtime(job), train_job(job)]
    elif opts.engine == "jobset":
        files["jobset.yaml"] = [jobset(job)]
    elif opts.engine == "pytorchjob":
        files["pytorchjob.yaml"] = [pytorchjob(job)]
    else:
        files["indexed-job.yaml"] = [headless_service(job), indexed_job(job)]
    port = metrics_port(cfg)
    if port is not None and opts.monitor == "pod":
        files["podmonitor.yaml"] = [pod_monitor(job)]
    elif port is not None and opts.monitor == "service":
        files["servicemonitor.yaml"] = [metrics_service(job, port), service_monitor(job)]
    files["networkpolicy.yaml"] = [network_policy(job)]
    if opts.dashboard:
        files["dashboard.yaml"] = [dashboard_config_map(job, opts.dashboard)]
    files["kustomization.yaml"] = [
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": list(files),
        }
    ]
    return files


class _Dumper(yaml.SafeDumper):
    """Plain YAML a person reads: no anchors and aliases, multi-line strings as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(documents: list[dict[str, Any]]) -> str:
    body = yaml.dump_all(
        documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return HEADER + body


def write(files: Manifests, out_dir: str | Path) -> list[Path]:
    """Write each file into `out_dir` (created if needed); returns the paths written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, documents in files.items():
            (out / name).write_text(to_yaml(documents), encoding="utf-8")
            written.append(out / name)
    except OSError as err:
        raise ConfigError(f"k8s render: cannot write to {out}: {err.strerror}") from None
    return written


def stream(files: Manifests) -> str:
    """Every resource as one YAML stream, for `... | kubectl apply -f -`."""
    documents = [
        doc for name, docs in files.items() if name != "kustomization.yaml" for doc in docs
    ]
    return to_yaml(documents)
