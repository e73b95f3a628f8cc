"""Two of the engines that start a cohort on Kubernetes, one pod per peer (the Kubeflow Trainer
v2 TrainJob and the JobSet are in jobset.py).

- Kubeflow PyTorchJob (kubeflow.org/v1, deprecated with the Training Operator v1): the training
  operator is the launcher. It gives every
  pod MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK, which is what torch's env:// initialisation
  reads, so the container runs `dml-cluster train` directly. Nothing sits between the operator
  and the trainer, so the trainer's exit code is the pod's: under `restartPolicy: ExitCode`
  128-255 (PeerError, 200) are retried and 1-127 (ConfigError, 2) fail the job at once.
- Indexed Job + headless Service (plain Kubernetes): torchrun in every pod, c10d rendezvous
  hosted by the agent of pod 0, which every pod reaches by its stable DNS name
  `<job>-0.<service>.<namespace>.svc.<cluster domain>`. torchrun restarts a failed peer group
  itself (PET_MAX_RESTARTS); the Job's backoffLimit bounds pod failures beyond that.
"""

from __future__ import annotations

from typing import Any

from dml_cluster.k8s.data import add_data
from dml_cluster.k8s.meta import Job
from dml_cluster.k8s.pod import CONFIG_PATH, base_env, container, pod_spec
from dml_cluster.k8s.security import seal_pod
from dml_cluster.preemption import launcher_wait_s

RDZV_PORT_NAME = "c10d"
MASTER_PORT_NAME = "pytorchjob-port"  # the port name the training operator reads MASTER_PORT from


def pytorchjob(job: Job) -> dict[str, Any]:
    cfg, opts = job.cfg, job.opts
    main = container(
        cfg, opts,
        command=["dml-cluster"],
        args=["train", CONFIG_PATH],
        env=base_env(cfg),
        extra_ports=[
            {"name": MASTER_PORT_NAME, "containerPort": opts.master_port, "protocol": "TCP"}
        ],
    )  # fmt: skip
    template = {
        "metadata": {"labels": job.labels("peer")},
        "spec": add_data(job.data, seal_pod(job, pod_spec(opts, job.config_map, main))),
    }

    def replicas(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "ExitCode", "template": template}

    specs = {"Master": replicas(1)}
    if job.size > 1:
        specs["Worker"] = replicas(job.size - 1)
    run_policy: dict[str, Any] = {"backoffLimit": opts.backoff_limit, "cleanPodPolicy": "None"}
    if job.queued:
        run_policy["suspend"] = True
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": job.workload_metadata(),
        "spec": {
            "nprocPerNode": "1",
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": specs,
        },
    }


def rendezvous_host(job: Job) -> str:
    """Pod 0's DNS name: Indexed Job pods are named <job>-<index>, the Service is <job>."""
    return f"{job.name}-0.{job.name}.{job.opts.namespace}.svc.{job.opts.cluster_domain}"


def torchrun_env(job: Job) -> list[dict[str, str]]:
    """torchrun reads every flag from PET_<FLAG>; these make `torchrun -m ...` a cohort member."""
    opts = job.opts
    return [
        {"name": "PET_NNODES", "value": str(job.size)},
        {"name": "PET_NPROC_PER_NODE", "value": "1"},
        {"name": "PET_RDZV_BACKEND", "value": "c10d"},
        {"name": "PET_RDZV_ENDPOINT", "value": f"{rendezvous_host(job)}:{opts.rdzv_port}"},
        {"name": "PET_RDZV_ID", "value": job.name},
        {"name": "PET_MAX_RESTARTS", "value": str(opts.max_restarts)},
        # a restarted group needs a fresh store: stale keys in the shared one break gloo
        {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"},
        # after passing a SIGTERM on, wait for the peers' checkpoint save before killing them
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(launcher_wait_s(job.cfg))},
    ]


def headless_service(job: Job) -> dict[str, Any]:
    """Gives pod i the DNS name <job>-i.<job>, published before the pods are ready: the
    rendezvous must be reachable while every pod is still starting."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": job.metadata(job.name, "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": job.selector(),
            "ports": [
                {"name": RDZV_PORT_NAME, "port": job.opts.rdzv_port, "targetPort": RDZV_PORT_NAME}
            ],
        },
    }


def indexed_job(job: Job) -> dict[str, Any]:
    cfg, opts = job.cfg, job.opts
    main = container(
        cfg, opts,
        command=["torchrun"],
        args=["-m", "dml_cluster", "train", CONFIG_PATH],
        env=[*base_env(cfg), *torchrun_env(job)],
        extra_ports=[
            {"name": RDZV_PORT_NAME, "containerPort": opts.rdzv_port, "protocol": "TCP"}
        ],
    )  # fmt: skip
    spec = pod_spec(opts, job.config_map, main, restartPolicy="Never", subdomain=job.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job.workload_metadata(),
        "spec": {
            **({"suspend": True} if job.queued else {}),
            "completionMode": "Indexed",
            "completions": job.size,
            "parallelism": job.size,
            # one incident (a lost node, a lost peer) can fail every pod of the cohort once
            "backoffLimit": opts.backoff_limit * job.size,
            "podFailurePolicy": {
                "rules": [
                    # preemption, eviction, node drain: not the job's fault, not counted
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    }
                ]
            },
            "template": {
                "metadata": {"labels": job.labels("peer")},
                "spec": add_data(job.data, seal_pod(job, spec)),
            },
        },
    }
