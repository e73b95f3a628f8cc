"""Every rendered manifest validates offline.

Core resources against the Kubernetes JSON schemas that kubernetes-validate ships (strict:
unknown fields are errors); the TrainJob, TrainingRuntime, JobSet, PyTorchJob, PodMonitor and
ServiceMonitor (and Kueue's LocalQueue in k8s/README.md) against the openAPIV3Schema of their
CRDs in ../shared/k8s-schemas/ (DML_K8S_SCHEMAS overrides), made strict the same way, since an
API server silently prunes a field its schema does not name; the Jobs and pods inside them
against Kubernetes' own schemas too.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from torch.distributed.run import get_args_parser

from dml_cluster.k8s import RenderOptions, pod_config, render, write
from dml_cluster.k8s.render import to_yaml

from .cohort_runs import cli_each
from .conftest import REPO, run_cli
from .k8s_helpers import find, load_dir

CONFIG = REPO / "configs" / "digits-dml.yaml"
SETS = ["bus.transport=zmq"]
SCHEMAS = Path(os.environ.get("DML_K8S_SCHEMAS", REPO.parent / "shared" / "k8s-schemas"))
CRDS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): (
        "trainer.kubeflow.org_trainingruntimes.yaml"
    ),
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): (
        "trainer.kubeflow.org_clustertrainingruntimes.yaml"
    ),
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.x-k8s.io_jobsets.yaml",
    ("kueue.x-k8s.io/v1beta1", "LocalQueue"): "kueue.x-k8s.io_localqueues.yaml",
    ("kueue.x-k8s.io/v1beta2", "LocalQueue"): "kueue.x-k8s.io_localqueues.yaml",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}
# the oldest Kubernetes the manifests target (podFailurePolicy on by default) and the newest
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# committed examples in k8s/examples/, rendered with these options (see k8s/README.md)
EXAMPLES = {
    "trainjob": dict(
        engine="trainjob",
        monitor="pod",
        dashboard="monitoring/grafana-dashboard.json",
        pvc="dml-runs",
        data_pvc="datasets",
        queue="team-a",
        priority_class="high",
    ),  # fmt: skip
    "jobset": dict(engine="jobset", monitor="pod"),
    "indexed-job": dict(engine="indexed-job", monitor="service"),
    "pytorchjob": dict(engine="pytorchjob", monitor="pod"),
}
ENGINES = ("trainjob", "jobset", "indexed-job", "pytorchjob")
WORKLOADS = {"trainjob": "TrainJob", "jobset": "JobSet", "indexed-job": "Job",
             "pytorchjob": "PyTorchJob"}  # fmt: skip
EXAMPLE_IMAGE = "registry.example.com/dml-cluster:0.1.0"


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever an object schema lists its properties."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    path = SCHEMAS / CRDS[(api_version, kind)]
    if not path.exists():
        pytest.skip(f"CRD schemas not found at {SCHEMAS} (set DML_K8S_SCHEMAS)")
    # libyaml's parser where PyYAML has it: the Trainer's and JobSet's CRDs are 0.5-0.8 MB
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(_strict(served["schema"]["openAPIV3Schema"]))


def validate(doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRDS:
        errors = sorted(crd_validator(*key).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
        for template in job_templates(doc):
            validate({"apiVersion": "batch/v1", "kind": "Job", **template})
        for template in pod_templates(doc):
            validate({"apiVersion": "v1", "kind": "Pod", **template})
        return
    if doc["apiVersion"].startswith("kustomize.config.k8s.io"):
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def job_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The Job templates of a JobSet or a training runtime's JobSet template."""
    if doc["kind"] == "JobSet":
        return [r["template"] for r in doc["spec"]["replicatedJobs"]]
    if doc["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime"):
        return [r["template"] for r in doc["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "PyTorchJob":
        return [s["template"] for s in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    return [t["spec"]["template"] for t in job_templates(doc)]


def options(**overrides: Any) -> RenderOptions:
    return RenderOptions(image=EXAMPLE_IMAGE, namespace="dml", **overrides)


def rendered(sets: list[str] = SETS, **overrides: Any) -> dict[str, list[dict[str, Any]]]:
    cfg, raw = pod_config(CONFIG, sets)
    return render(cfg, raw, options(**overrides))


@pytest.fixture
def dashboard(tmp_path: Path) -> str:
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps({"title": "dml-cluster", "panels": []}))
    return str(path)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("monitor", ["pod", "service"])
def test_every_manifest_validates(engine: str, monitor: str, dashboard: str) -> None:
    files = rendered(
        engine=engine, monitor=monitor, pvc="dml-runs", gpus_per_peer=2, dashboard=dashboard,
        queue="gpu", priority_class="high", data_pvc="datasets", data_pvc_mount="/datasets",
        labels={"team": "vision"}, monitor_labels={"release": "prometheus"},
    )  # fmt: skip
    kinds = sorted(d["kind"] for docs in files.values() for d in docs)
    monitor_kinds = ["PodMonitor"] if monitor == "pod" else ["Service", "ServiceMonitor"]
    engine_kinds = {
        "trainjob": ["TrainJob", "TrainingRuntime"], "jobset": ["JobSet"],
        "indexed-job": ["Job", "Service"], "pytorchjob": ["PyTorchJob"],
    }[engine]  # fmt: skip
    expected = [
        "ConfigMap", "ConfigMap", "Kustomization", "NetworkPolicy", *engine_kinds, *monitor_kinds
    ]  # fmt: skip
    assert kinds == sorted(expected)
    for docs in files.values():
        for doc in docs:
            validate(doc)


def test_the_validators_are_strict() -> None:
    """A misspelt field fails, for a core resource and for a custom one."""
    files = rendered(engine="indexed-job")
    job = find(files, "Job")
    job["spec"]["template"]["spec"]["containers"][0]["enviroment"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)
    monitor = find(rendered(), "PodMonitor")
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(AssertionError, match="podMetricEndpoints"):
        validate(monitor)


def test_pytorchjob_is_what_the_training_operator_expects() -> None:
    job = find(rendered(engine="pytorchjob"), "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    for spec in specs.values():
        assert spec["restartPolicy"] == "ExitCode"
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"pytorchjob-port": 23456, "metrics": 9400}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3
    single = find(rendered([*SETS, "cohort.size=1"], engine="pytorchjob"), "PyTorchJob")
    assert list(single["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def test_indexed_job_env_is_what_torchrun_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun takes every flag from PET_<FLAG>: parse the container's command line with the
    container's env and check the rendezvous it would join."""
    files = rendered(engine="indexed-job", max_restarts=2)
    service, job = files["indexed-job.yaml"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun"]
    for var in container["env"]:
        monkeypatch.setenv(var["name"], var["value"])
    args = get_args_parser().parse_args(container["args"])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "1", "c10d")
    assert args.rdzv_endpoint == "digits-dml-0.digits-dml.dml.svc.cluster.local:29400"
    assert args.max_restarts == 2 and args.module and args.training_script == "dml_cluster"
    # pod 0's DNS name exists: the Service is headless, named as the pods' subdomain, publishes
    # addresses before readiness and selects the job's pods
    spec = job["spec"]["template"]["spec"]
    assert (
        service["spec"]["clusterIP"] == "None" and spec["subdomain"] == service["metadata"]["name"]
    )
    assert service["spec"]["publishNotReadyAddresses"] is True
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2


def test_monitors_select_the_peer_pods() -> None:
    files = rendered(engine="indexed-job", monitor="service")
    pod_labels = find(files, "Job")["spec"]["template"]["metadata"]["labels"]
    metrics_service, monitor = files["servicemonitor.yaml"]
    assert metrics_service["spec"]["selector"].items() <= pod_labels.items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= metrics_service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    for engine in ENGINES:
        files = rendered(engine=engine)
        pod_monitor = find(files, "PodMonitor")
        for doc in (d for docs in files.values() for d in docs):
            for template in pod_templates(doc):
                labels = template["metadata"]["labels"]
                assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_metrics_off_means_no_monitor_and_no_port() -> None:
    files = rendered([*SETS, "metrics.enabled=false"], engine="pytorchjob")
    assert "podmonitor.yaml" not in files
    container = find(files, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"
    ]["containers"][0]
    assert [p["name"] for p in container["ports"]] == ["pytorchjob-port"]
    files = rendered([*SETS, "metrics.enabled=false"])
    assert "podmonitor.yaml" not in files
    (container,) = _pod_spec(files)["containers"]
    assert container["ports"] == []


def test_config_map_carries_the_config_the_pods_train() -> None:
    files = rendered([*SETS, "train.max_steps=7"])
    shipped = yaml.safe_load(find(files, "ConfigMap")["data"]["config.yaml"])
    assert shipped["train"]["max_steps"] == 7 and shipped["bus"]["transport"] == "zmq"
    assert shipped["run"]["out_dir"] == "runs"  # inside the pod's workspace volume


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_committed_examples_are_up_to_date(example: str, tmp_path: Path) -> None:
    """k8s/examples/ is rendered output: re-rendering must reproduce it (see k8s/README.md)."""
    settings = dict(EXAMPLES[example])
    if "dashboard" in settings:
        settings["dashboard"] = str(REPO / settings["dashboard"])
    write(rendered(**settings), tmp_path)
    committed = REPO / "k8s" / "examples" / example
    fresh = {p.name: p.read_text(encoding="utf-8") for p in sorted(tmp_path.iterdir())}
    assert {p.name: p.read_text(encoding="utf-8") for p in sorted(committed.iterdir())} == fresh, (
        f"k8s/examples/{example} is stale: run the command in k8s/README.md"
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_examples_build_with_kustomize(example: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "k8s" / "examples" / example)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    built = list(yaml.safe_load_all(result.stdout))
    files = load_dir(REPO / "k8s" / "examples" / example)
    assert len(built) == sum(len(d) for n, d in files.items() if n != "kustomization.yaml")


def test_yaml_output_has_no_aliases() -> None:
    text = to_yaml(rendered()["trainjob.yaml"])
    assert "&id" not in text and "*id" not in text


BAD_INPUT = [
    ([], "bus.transport is 'local'"),
    (["--set", "bus.transport=torch", "--curve-secret", "keys"], "CURVE encrypts the zmq bus"),
    (["--set", "bus.transport=zmq", "--set", "metrics.port=0"], "metrics.port"),
    (["--set", "bus.transport=zmq", "--name", "Not_A_Name"], "not a valid job name"),
    (["--set", "bus.transport=zmq", "--label", "novalue"], "expected KEY=VALUE"),
    (["--set", "bus.transport=zmq", "--set", "cohort.size=0"], "config error"),
    (["--set", "bus.transport=zmq", "--queue", "Team_A"], "--queue 'Team_A' is not a valid"),
    (["--set", "bus.transport=zmq", "--data-pvc", "datasets:data"], "must be an absolute path"),
    (["--set", "bus.transport=zmq", "--data-pvc", "d", "--data-in-image", "/d"], "give one of"),
    (["--set", "bus.transport=zmq", "--data-host-path", "/srv:/workspace"], "is taken"),
]


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory: pytest.TempPathFactory) -> list[subprocess.CompletedProcess]:
    """`dml-cluster k8s render` on each BAD_INPUT, one after the other in one process, each with
    its own exit status and output (tests/cohort_runs.py)."""
    commands = [["k8s", "render", str(CONFIG), "--image", "x:1", *args] for args, _ in BAD_INPUT]
    return cli_each(commands, tmp_path_factory.mktemp("bad-input") / "each.json")


@pytest.mark.parametrize(("case", "message"), list(enumerate(m for _, m in BAD_INPUT)))
def test_bad_input_is_one_line_and_exit_2(
    bad_input: list[subprocess.CompletedProcess], case: int, message: str
) -> None:
    result = bad_input[case]
    if case == 0:  # the same as in a process of its own
        alone = run_cli(*result.args[1:])
        assert (alone.returncode, alone.stderr) == (result.returncode, result.stderr)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- the sealed deployment: NetworkPolicy, CURVE keys from a Secret, the preemption grace ---------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels / matchExpressions In, Exists) applied to labels."""
    match = selector.get("matchLabels", {})
    if not match.items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _admits(policy: dict[str, Any], source: tuple[str, dict[str, str]], port: int) -> bool:
    """Whether `policy` lets a pod (namespace, labels) reach `port` of the pods it selects
    (NetworkPolicy semantics: any rule; in a rule, any peer and any port; a peer with both
    selectors needs both; a podSelector alone means the policy's own namespace)."""
    namespace, labels = source
    own = policy["metadata"]["namespace"]
    for rule in policy["spec"]["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        for peer in rule["from"]:
            ns_selector = peer.get("namespaceSelector")
            ns_labels = {"kubernetes.io/metadata.name": namespace}
            in_namespace = _selects(ns_selector, ns_labels) if ns_selector else namespace == own
            pod_ok = _selects(peer["podSelector"], labels) if "podSelector" in peer else True
            if in_namespace and pod_ok:
                return True
    return False


@pytest.mark.parametrize("engine", ENGINES)
def test_the_network_policy_admits_peers_and_prometheus_only(engine: str) -> None:
    """The policy selects exactly the job's peer pods; into them: the cohort's own pods on any
    port (rendezvous, bus, gloo's ephemeral connections), Prometheus's pods in their namespace on
    the metrics port only; another job's pods, other pods of Prometheus's namespace, Prometheus
    in another namespace, and anything else: nothing."""
    files = rendered(engine=engine, prometheus_namespace="monitoring")
    policy = find(files, "NetworkPolicy")
    validate(policy)
    templates = [t for docs in files.values() for d in docs for t in _templates(d)]
    assert templates
    peer = templates[0]["metadata"]["labels"]
    for template in templates:
        assert _selects(policy["spec"]["podSelector"], template["metadata"]["labels"])
    other_job = {**peer, "app.kubernetes.io/instance": "another-job"}
    assert not _selects(policy["spec"]["podSelector"], other_job)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    ports = {"metrics": 9400, "rendezvous": 29400, "master": 23456, "bus": 5555, "gloo": 41234}
    for port in ports.values():
        assert _admits(policy, ("dml", peer), port)
        assert not _admits(policy, ("dml", other_job), port)
        assert not _admits(policy, ("dml", {"app": "debug-shell"}), port)
        assert not _admits(policy, ("other", peer), port)  # the same labels elsewhere
    assert _admits(policy, ("monitoring", prometheus), ports["metrics"])
    for name, port in ports.items():
        if name != "metrics":
            assert not _admits(policy, ("monitoring", prometheus), port)
    assert not _admits(policy, ("monitoring", {"app": "grafana"}), ports["metrics"])
    assert not _admits(policy, ("default", prometheus), ports["metrics"])
    closed = find(rendered([*SETS, "metrics.enabled=false"], engine=engine), "NetworkPolicy")
    assert not _admits(closed, ("monitoring", prometheus), ports["metrics"])


def _templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_templates(doc)


def _pod_spec(files: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    docs = [d for docs in files.values() for d in docs if pod_templates(d)]
    (doc,) = docs
    return _templates(doc)[0]["spec"]


@pytest.mark.parametrize("engine", ENGINES)
def test_curve_is_on_for_a_multi_peer_zmq_cohort(engine: str) -> None:
    """By default the pods mount the Secret <job>-curve at the path the shipped config's
    bus.curve_keys names; --curve-secret names another; --no-curve, the torch transport and a
    cohort of one leave the bus open (no Secret, no curve_keys). The pods' grace period is
    checkpoint.on_signal.grace_s plus the exit margin."""
    from dml_cluster.k8s.security import CURVE_DIR, EXIT_MARGIN_S

    def sealed(files: dict[str, list[dict[str, Any]]]) -> str | None:
        spec = _pod_spec(files)
        secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
        mounts = [m["mountPath"] for m in spec["containers"][0]["volumeMounts"]]
        shipped = yaml.safe_load(find(files, "ConfigMap")["data"]["config.yaml"])
        keys = shipped["bus"].get("curve_keys")
        assert (keys == CURVE_DIR) == bool(secrets) == (CURVE_DIR in mounts)
        return secrets[0] if secrets else None

    files = rendered([*SETS, "checkpoint.on_signal.grace_s=42.5"], engine=engine)
    assert sealed(files) == "digits-dml-curve"
    assert _pod_spec(files)["terminationGracePeriodSeconds"] == 43 + EXIT_MARGIN_S
    assert sealed(rendered(engine=engine, curve_secret="team-keys")) == "team-keys"
    assert sealed(rendered(engine=engine, curve=False)) is None
    assert sealed(rendered(["bus.transport=torch"], engine=engine)) is None
    assert sealed(rendered([*SETS, "cohort.size=1"], engine=engine)) is None


def test_keys_generate_writes_a_secret_the_pods_can_use(tmp_path: Path) -> None:
    """`keys generate DIR --k8s-secret NAME`: DIR/NAME.yaml is a valid Secret (owner-only file)
    whose files, mounted as a folder, are the key pair the bus loads."""
    from dml_cluster.bus.curve import generate_keys, load_curve_keys
    from dml_cluster.k8s.security import write_curve_secret

    generate_keys(tmp_path / "keys")  # the command's steps, in this process (test_k8s_env runs it)
    write_curve_secret(tmp_path / "keys", "digits-dml-curve", "dml")
    path = tmp_path / "keys" / "digits-dml-curve.yaml"
    assert path.stat().st_mode & 0o077 == 0
    secret = yaml.safe_load(path.read_text())
    validate(secret)
    assert secret["metadata"] == {
        **secret["metadata"],
        "name": "digits-dml-curve",
        "namespace": "dml",
    }
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for name, data in secret["data"].items():
        (mounted / name).write_bytes(base64.b64decode(data))
    keys = load_curve_keys(mounted, "small_cnn-0", ["small_cnn-0", "small_cnn-1"])
    assert keys.peers["small_cnn-1"] == keys.public


# -- Kubeflow Trainer v2, JobSet, Kueue, the user's data ------------------------------------------


def test_trainjob_is_what_the_trainer_expects() -> None:
    """One process per node, stated (not 'auto'); the GPU request in resourcesPerNode; none of
    the PET_* the Trainer reserves; the runtime rendered beside it, named as referenced, its
    trainer step the replicated job `node` with the container `node`; exit codes 143 and 200
    retried, any other failing the job; the runtime's name overridable."""
    from dml_cluster.launch import PET_VARIABLES

    files = rendered(gpus_per_peer=2)
    runtime, trainjob = files["trainjob.yaml"]
    trainer = trainjob["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 1)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 2
    assert trainer["command"] == ["dml-cluster"] and "suspend" not in trainjob["spec"]
    assert not {e["name"] for e in trainer["env"]} & {*PET_VARIABLES, "PET_NPROC_PER_NODE"}
    assert trainjob["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
        "name": runtime["metadata"]["name"],
    }  # fmt: skip
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 2, "torch": {}}
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"
    }
    job_spec = node["template"]["spec"]
    (container,) = job_spec["template"]["spec"]["containers"]
    assert container["name"] == "node"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9400}
    rules = job_spec["podFailurePolicy"]["rules"]
    assert rules[1] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "node", "operator": "NotIn", "values": [143, 200]},
    }
    assert job_spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] == 3
    renamed = rendered(runtime="dml-gpu")["trainjob.yaml"]
    assert renamed[0]["metadata"]["name"] == renamed[1]["spec"]["runtimeRef"]["name"] == "dml-gpu"


def test_jobset_is_what_the_trainer_makes_of_the_trainjob() -> None:
    """--engine jobset renders the JobSet the Trainer would make of the TrainJob and its
    runtime (tests/k8s_helpers.py: the torch plugin's env, the overrides): the same pods, so the
    TrainJob's local run in test_k8s_env.py covers both."""
    from .k8s_helpers import as_trainer_would

    for extra in ({}, {"queue": "q", "data_pvc": "datasets", "gpus_per_peer": 0}):
        runtime, trainjob = rendered(**extra)["trainjob.yaml"]
        jobset = find(rendered(engine="jobset", **extra), "JobSet")
        assert as_trainer_would(runtime, trainjob) == jobset


@pytest.mark.parametrize("engine", ENGINES)
def test_queue_labels_and_a_suspended_start(engine: str) -> None:
    """--queue / --priority-class: Kueue's labels on the workload Kueue admits (not on its pods,
    which would make them pod workloads of their own); the workload starts suspended."""
    queued = find(rendered(engine=engine, queue="team-a", priority_class="high"),
                  WORKLOADS[engine])  # fmt: skip
    labels = queued["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["kueue.x-k8s.io/priority-class"] == "high"
    spec = queued["spec"]
    suspended = spec["runPolicy"]["suspend"] if engine == "pytorchjob" else spec["suspend"]
    assert suspended is True
    for template in pod_templates(queued):
        assert "kueue.x-k8s.io/queue-name" not in template["metadata"]["labels"]
    plain = find(rendered(engine=engine), WORKLOADS[engine])
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]
    assert "suspend" not in plain["spec"] and "suspend" not in plain["spec"].get("runPolicy", {})


def test_a_gpu_run_without_a_gpu_request_warns(capsys: pytest.CaptureFixture[str]) -> None:
    rendered([*SETS, "cohort.devices=[cuda,cuda]"], gpus_per_peer=0)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "warning" in line and "cohort.devices" in line and "--gpus-per-peer 0" in line
    rendered([*SETS, "cohort.devices=[cuda,cuda]"], gpus_per_peer=1)
    rendered(gpus_per_peer=0)  # a CPU run
    assert capsys.readouterr().err == ""


def _shipped(files: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return yaml.safe_load(find(files, "ConfigMap")["data"]["config.yaml"])


TEACHER = "runs/teacher-run/final/teacher.pt"
DATA_SETS = [*SETS, "data.root=datasets/digits", "cohort.weights=/opt/weights/a.pt"]


@pytest.mark.parametrize("engine", ENGINES)
def test_data_on_a_claim_a_host_path_or_in_the_image(
    engine: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each way of bringing the data: the volume mounted read-only where the rewritten paths
    point; a relative path rewritten under the mount; an absolute one checked against it (one
    warning naming the key when no pod reaches it); a path under run.out_dir stays a run
    folder of the workspace."""
    cases = {
        "pvc": dict(data_pvc="datasets", data_pvc_mount="/mnt/data"),
        "host": dict(data_host_path="/srv/datasets", data_host_mount="/mnt/data"),
        "image": dict(data_in_image="/mnt/data"),
    }
    for way, extra in cases.items():
        files = rendered(DATA_SETS, engine=engine, pvc="dml-runs", **extra)
        shipped = _shipped(files)
        assert shipped["data"]["root"] == "/mnt/data/datasets/digits"
        spec = _pod_spec(files)
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        if way == "image":
            assert "data" not in volumes
            assert capsys.readouterr().err == ""  # /opt/weights is the image's own
            continue
        assert mounts["data"] == {"name": "data", "mountPath": "/mnt/data", "readOnly": True}
        claim = {"claimName": "datasets", "readOnly": True}
        host = {"path": "/srv/datasets", "type": "Directory"}
        source = {"pvc": {"persistentVolumeClaim": claim}, "host": {"hostPath": host}}[way]
        assert volumes["data"] == {"name": "data", **source}
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "cohort.weights" in line and "no pod can reach" in line
    # nothing given: one line per key no pod reaches
    rendered(DATA_SETS, engine=engine)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [ln.split(": ")[3] for ln in lines] == ["data.root", "cohort.weights"]
    # a run folder (an earlier run's weights) is the workspace's: it needs --pvc
    files = rendered([*SETS, f"cohort.weights={TEACHER}"], engine=engine, pvc="dml-runs")
    assert capsys.readouterr().err == ""
    assert _shipped(files)["cohort"]["weights"] == TEACHER
    rendered([*SETS, f"cohort.weights={TEACHER}"], engine=engine)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cohort.weights" in line and "--pvc" in line


def test_a_local_factory_module_is_imported_from_the_data(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.factory naming a module that is a file here (not installed): PYTHONPATH is the data
    mount; without a data source, a warning naming the key."""
    (tmp_path / "mydata.py").write_text("from tests.data_factories import blobs  # noqa: F401\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    sets = [*SETS, "data.name=python", "data.factory=mydata:blobs"]
    files = rendered(sets, data_pvc="datasets")
    env = {e["name"]: e["value"] for e in _pod_spec(files)["containers"][0]["env"]}
    trainer_env = {e["name"]: e["value"] for e in find(files, "TrainJob")["spec"]["trainer"]["env"]}
    assert env["PYTHONPATH"] == trainer_env["PYTHONPATH"] == "/data"
    assert capsys.readouterr().err == ""
    rendered(sets)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "data.factory: module 'mydata' is a local file (mydata.py)" in line


def test_text_data_and_hf_models_come_from_the_data_mount(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A language-model config: the training globs, the validation file, the tokenizer.json and
    an `hf:` model folder are rewritten under the read-only data mount (relative ones) or
    checked against it (an absolute one outside: one warning naming its key); the token cache
    goes to the writable workspace; the manifests validate."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text('{"model_type": "gpt2"}')
    monkeypatch.chdir(tmp_path)  # relative paths are the data's layout, as render runs here
    peers = ("cohort.peers=[{name: g, model: gpt, args: {n_layer: 1}}, "
             "{name: h, model: 'hf:models/tiny'}]")  # fmt: skip
    sets = ["bus.transport=zmq", "data.tokenizer=tok/tokenizer.json", peers,
            "data.cache_dir=/home/me/cache", "cohort.size=null", "cohort.model=null"]  # fmt: skip
    cfg, raw = pod_config(REPO / "configs" / "lm-dml.yaml", sets)
    files = render(cfg, raw, options(engine="jobset", data_pvc="corpora", data_pvc_mount="/text"))
    assert capsys.readouterr().err == ""
    data = _shipped(files)["data"]
    assert data["train"] == ["/text/docs/*.md", "/text/benchmarks/*.md"]
    assert data["val"] == "/text/README.md" and data["tokenizer"] == "/text/tok/tokenizer.json"
    assert _shipped(files)["cohort"]["peers"][1]["model"] == "hf:/text/models/tiny"
    spec = _pod_spec(files)
    (main,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert mounts["/text"] == {"name": "data", "mountPath": "/text", "readOnly": True}
    cache = Path(main["workingDir"]) / data["cache_dir"]  # relative: the working directory's
    workspace = mounts[main["workingDir"]]
    assert workspace["name"] == "workspace" and not workspace.get("readOnly")
    assert cache.is_relative_to(main["workingDir"]) and data["cache_dir"] == "runs/.cache/tokens"
    for docs in files.values():
        for doc in docs:
            validate(doc)
    render(*pod_config(REPO / "configs" / "lm-dml.yaml", [*sets, "data.val=/srv/val.txt"]),
           options(engine="jobset", data_pvc="corpora", data_pvc_mount="/text"))  # fmt: skip
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "data.val: /srv/val.txt is not under the data mount /text" in line


def test_the_manifests_in_the_readme_validate() -> None:
    """The LocalQueue and the TensorBoard pod k8s/README.md shows validate (Kueue's CRD, the
    core schemas)."""
    text = (REPO / "k8s" / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    docs = [d for b in blocks for d in yaml.safe_load_all(b) if d]
    assert sorted(d["kind"] for d in docs) == ["LocalQueue", "Pod"]
    for doc in docs:
        validate(doc)
