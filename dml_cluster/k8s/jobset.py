"""Kubeflow Trainer v2 (`trainer.kubeflow.org/v1alpha1`): a TrainJob and the project's own
TrainingRuntime beside it; and the JobSet (`jobset.x-k8s.io/v1alpha2`) the Trainer makes of the
two, for clusters that run JobSet without the Trainer.

The Trainer's torch plugin gives the container named `node` of the replicated job `node` (the
one labelled as the `trainer` step) the torchrun variables: PET_NNODES (`trainer.numNodes`),
PET_NPROC_PER_NODE (`trainer.numProcPerNode`), PET_NODE_RANK (the Job's completion index),
PET_MASTER_ADDR (`<job>-node-0-0.<job>`, pod 0 by the JobSet's headless Service) and
PET_MASTER_PORT (29400, which it also declares as a container port). The container runs
`dml-cluster train` itself, which reads those variables when no launcher set RANK (one process
per node: `adopt_torch_runtime_env` in dml_cluster/launch/environment.py). No torchrun in
between, so the pod's exit code is the trainer's and the failure policy can tell a retryable
failure (143: SIGTERM after a checkpoint; 200: a lost peer) from a permanent one (2: bad config
or data).

Why not the Trainer's default `torch-distributed` ClusterTrainingRuntime: its pods are never
restarted, and a TrainJob's patches cannot set the ports, volumes and failure policy a cohort
needs; the runtime rendered here carries them (the pod template of every engine: pod.py,
security.py, data.py).
"""

from __future__ import annotations

from typing import Any

from dml_cluster.k8s.data import add_data
from dml_cluster.k8s.meta import Job
from dml_cluster.k8s.pod import CONFIG_PATH, base_env, container, pod_spec
from dml_cluster.k8s.security import seal_pod

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
NODE = "node"  # the Trainer's name of the trainer's replicated job and of its container
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
FRAMEWORK_LABEL = "trainer.kubeflow.org/framework"
TRAINER_PORT = 29400  # the Trainer's PET_MASTER_PORT
RETRYABLE_EXIT_CODES = (143, 200)  # SIGTERM after a checkpoint; a lost peer (PeerError)
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
PET_VARIABLES = (
    "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"
)  # fmt: skip


def runtime_name(job: Job) -> str:
    return job.opts.runtime or job.name


def _trainer_env(job: Job) -> list[dict[str, str]]:
    """The env the TrainJob's trainer sets (none of the PET_* the Trainer reserves)."""
    return [*base_env(job.cfg), *job.data.env]


def _node_container(job: Job, env: list[dict[str, Any]]) -> dict[str, Any]:
    main = container(
        job.cfg, job.opts, command=["dml-cluster"], args=["train", CONFIG_PATH], env=env,
        extra_ports=[],
    )  # fmt: skip
    return {"name": NODE, **{k: v for k, v in main.items() if k != "name"}}


def _pod_template(job: Job, main: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(job.opts, job.config_map, main, restartPolicy="Never")
    return {
        "metadata": {"labels": job.labels("peer")},
        "spec": add_data(job.data, seal_pod(job, spec)),
    }


def _jobset_spec(job: Job, pod_template: dict[str, Any]) -> dict[str, Any]:
    """One replicated job `node` of K indexed pods. A pod that exits 143 or 200 is replaced
    (counted against the Job's backoffLimit: one incident can fail every pod once); any other
    exit code fails the Job at once, and that fails the JobSet; a Job that runs out of retries
    restarts the whole cohort (JobSet failurePolicy.maxRestarts). Disruptions (preemption,
    eviction, drain) count for nothing."""
    size, opts = job.size, job.opts
    node_job = {
        "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
        "spec": {
            "completionMode": "Indexed",
            "completions": size,
            "parallelism": size,
            "backoffLimit": opts.backoff_limit * size,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": NODE,
                            "operator": "NotIn",
                            "values": list(RETRYABLE_EXIT_CODES),
                        },
                    },
                ]
            },
            "template": pod_template,
        },
    }
    return {
        "replicatedJobs": [{"name": NODE, "replicas": 1, "template": node_job}],
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "successPolicy": {"operator": "All", "targetReplicatedJobs": [NODE]},
        "failurePolicy": {
            "maxRestarts": opts.max_restarts,
            "rules": [
                {
                    "name": "permanent-error",
                    "action": "FailJobSet",
                    "onJobFailureReasons": ["PodFailurePolicy"],
                }
            ],
        },
    }


def training_runtime(job: Job) -> dict[str, Any]:
    """The project's TrainingRuntime: the pod every peer runs in, its failure policy."""
    main = _node_container(job, _trainer_env(job))
    main.pop("resources")  # the TrainJob's resourcesPerNode
    labels = {FRAMEWORK_LABEL: "torch"}
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainingRuntime",
        "metadata": job.metadata(runtime_name(job), "runtime", labels=labels),
        "spec": {
            "mlPolicy": {"numNodes": job.size, "torch": {}},
            "template": {"spec": _jobset_spec(job, _pod_template(job, main))},
        },
    }


def train_job(job: Job) -> dict[str, Any]:
    """The TrainJob: K nodes of one process each, referencing the runtime above."""
    main = _node_container(job, _trainer_env(job))
    spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": "trainer.kubeflow.org",
            "kind": "TrainingRuntime",
            "name": runtime_name(job),
        },
        "trainer": {
            "image": main["image"],
            "command": main["command"],
            "args": main["args"],
            "env": main["env"],
            "numNodes": job.size,
            "numProcPerNode": 1,
            "resourcesPerNode": main["resources"],
        },
    }
    if job.queued:
        spec = {"suspend": True, **spec}
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": job.workload_metadata(),
        "spec": spec,
    }


def master_host(name: str) -> str:
    """Pod 0 of the replicated job `node` of JobSet `name`, by the JobSet's headless Service."""
    return f"{name}-{NODE}-0-0.{name}"


def pet_env(name: str, nodes: int) -> list[dict[str, Any]]:
    """What the Trainer's torch plugin adds to the `node` container of TrainJob `name` of
    `nodes` nodes of one process each, in its order."""
    return [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": "1"},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "PET_MASTER_ADDR", "value": master_host(name)},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
    ]


def jobset(job: Job) -> dict[str, Any]:
    """The JobSet the Trainer would make of train_job + training_runtime (the same pods)."""
    main = _node_container(job, [*_trainer_env(job), *pet_env(job.name, job.size)])
    main["ports"] = [*main["ports"], {"containerPort": TRAINER_PORT, "protocol": "TCP"}]
    spec = _jobset_spec(job, _pod_template(job, main))
    if job.queued:
        spec = {"suspend": True, **spec}
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": job.workload_metadata(),
        "spec": spec,
    }
