"""Typed, validated experiment config: one YAML file per experiment, `--set a.b=c` overrides.

Everything is checked before anything starts; a problem is one `ConfigError` line naming the
key. Importing this module imports neither torch nor any method: each method family's settings
live in `dml_cluster.method_config` (torch-free). Loading a config does import torch: the names
of models and datasets are checked against their registries by `check_names` (called by
`parse_config`), which imports them when it runs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from dml_cluster.errors import ConfigError
from dml_cluster.method_config import (
    DEFAULT_METHOD,
    DMLConfig,
    MethodConfig,
    family_of,
    method_names,
    unknown_key,
)
from dml_cluster.schema import NamedPeerConfig, PeerConfig, Strict


class RunConfig(Strict):
    """Where results go and how the run is seeded."""

    name: str = "dml"
    seed: int = 0
    out_dir: str = "runs"
    deterministic: Literal["auto", "strict", "warn", "off"] = Field(
        "auto",
        description="strict: ops without a deterministic kernel raise; warn: they warn; off: "
        "fastest kernels (cuDNN benchmarking); auto: strict, but warn on CUDA when a peer's "
        "model is not built-in. true/false: the older spellings of strict/off",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast dtype of forward passes (fp16: CUDA only, with a loss scaler); "
        "the exchanged log-probabilities are always float32",
    )
    channels_last: bool = Field(False, description="models and batches in channels_last layout")
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = Field(
        False, description="torch.compile each peer's model (true: the default mode, or a mode)"
    )
    threads: int = Field(1, ge=1, description="torch intra-op threads per peer process")
    log_every: int = Field(10, ge=1, description="steps between per-step log records")
    progress_every_s: float = Field(
        30.0, ge=0.0,
        description="off a terminal (a log, a pod), seconds between progress lines of the "
        "reporting process; a terminal shows a live bar instead; 0: no progress output",
    )  # fmt: skip

    @field_validator("deterministic", mode="before")
    @classmethod
    def _older_spelling(cls, value: Any) -> Any:
        """true/false, the setting's earlier type: strict/off."""
        if isinstance(value, bool):
            return "strict" if value else "off"
        return value

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name


class AugmentConfig(Strict):
    crop_padding: int = Field(0, ge=0)
    flip: bool | None = Field(None, description="None: flip where the dataset says it makes sense")


class SubsetConfig(Strict):
    """A seeded, stratified subset of the training set (the rest is dropped, not unlabelled)."""

    per_class: int | None = Field(None, ge=1, description="samples kept of each class")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="of each class kept")
    seed: int | None = Field(None, description="which subset; default: run.seed")

    @model_validator(mode="after")
    def _one_size(self) -> SubsetConfig:
        if (self.per_class is None) == (self.fraction is None):
            raise ValueError("give exactly one of per_class and fraction")
        return self


class NormalizeConfig(Strict):
    """Per-channel statistics, in pixel values scaled to [0, 1] (torchvision's convention)."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _per_channel(self) -> NormalizeConfig:
        if len(self.mean) != len(self.std):
            raise ValueError("give mean and std with one value per channel each")
        if any(s <= 0 for s in self.std):
            raise ValueError("every std must be > 0")
        return self


class DataConfig(Strict):
    name: str = "digits"
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    factory: str | None = Field(
        None, description="name: python: 'package.module:function' returning the datasets"
    )
    image_size: int | None = Field(
        None, ge=1, description="imagefolder/python: resize the shorter side, centre-crop square"
    )
    normalize: NormalizeConfig | None = Field(
        None, description="imagefolder/python: mean/std; default: computed from the train split"
    )
    workers: int | None = Field(
        None, ge=0,
        description="DataLoader worker processes per peer process (0: read in the peer); "
        "default: 0 for in-memory datasets, else from the CPU count (at most 4)",
    )  # fmt: skip
    prefetch: int = Field(2, ge=1, description="batches each worker reads ahead")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)
    train_subset: SubsetConfig | None = Field(
        None, description="train on a stratified subset (applied before label_fraction)"
    )
    augment: AugmentConfig = AugmentConfig()
    # text (name: text) only; None elsewhere, so image configs hash as before
    train: str | list[str] | None = Field(None, description="text: training files (paths/globs)")
    val: str | list[str] | None = Field(None, description="text: validation files (paths/globs)")
    tokenizer: str | None = Field(
        None, description="text: 'bytes' (the default) or the path of a tokenizer.json"
    )
    block_size: int | None = Field(None, ge=1, description="text: tokens per training window")
    val_tokens: int | None = Field(
        None, ge=1, description="text: validation positions read at most (default 65,536)"
    )
    cache_dir: str | None = Field(
        None, description="text: where token files are cached; default <run.out_dir>/.cache/tokens"
    )

    @property
    def rows_per_sample(self) -> int:
        """Prediction rows per sample: a text window's positions (block_size), else one."""
        return self.block_size if self.name == "text" and self.block_size else 1


class CohortConfig(Strict):
    """The K peers: either `size` copies of `model`, or an explicit `peers` list."""

    size: int | None = Field(None, ge=1)
    model: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="every peer's initial weights (see peers' key)")
    peers: list[PeerConfig] | None = None
    update: Literal["simultaneous", "sequential"] = "simultaneous"
    devices: list[str] | None = Field(
        None,
        description="one device per peer ('cuda:0', 'cuda', 'cpu'; 'cuda' = the peer's round-robin "
        "GPU); default: peers spread round-robin over the visible GPUs, else the CPU",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="data-parallel processes per peer (D): the world is K peers x D replicas, "
        "each replica trains on 1/D of the peer's batch, gradients averaged over them",
    )
    shard: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="how a peer's replicas share it: ddp (a whole copy each) or fsdp (FSDP2 "
        "fully_shard: each keeps 1/D of the parameters and optimizer state)",
    )
    sync_batchnorm: bool = Field(
        False, description="BatchNorm statistics over the peer's replicas (SyncBatchNorm)"
    )

    @field_validator("devices")
    @classmethod
    def _device_names(cls, devices: list[str] | None) -> list[str] | None:
        for name in devices or []:
            if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
                raise ValueError(f"device {name!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        return devices

    @model_validator(mode="after")
    def _one_form(self) -> CohortConfig:
        if self.peers is None and (self.size is None or self.model is None):
            raise ValueError("give either cohort.peers or both cohort.size and cohort.model")
        if self.peers is not None:
            if self.model is not None or self.weights is not None:
                raise ValueError("give cohort.peers or cohort.model (and weights), not both")
            if len(self.peers) < 1:
                raise ValueError("cohort.peers must name at least one peer")
            if self.size is not None and self.size != len(self.peers):
                raise ValueError(
                    f"cohort.size is {self.size} but {len(self.peers)} peers are listed"
                )
        count = len(self.peers) if self.peers is not None else self.size
        if self.devices is not None and len(self.devices) != count:
            raise ValueError(f"cohort.devices names {len(self.devices)} devices for {count} peers")
        return self

    def resolved_peers(self) -> list[NamedPeerConfig]:
        """The peer list with every peer named (name defaults to `<model>-<index>`)."""
        peers = self.peers or [
            PeerConfig(model=self.model, args=self.args, weights=self.weights)
        ] * (self.size or 0)
        named = [
            NamedPeerConfig.model_validate(p.model_dump() | {"name": p.name or f"{p.model}-{i}"})
            for i, p in enumerate(peers)
        ]
        names = [p.name for p in named]
        if len(set(names)) != len(names):
            raise ConfigError(f"config error: cohort.peers: peer names must be unique, got {names}")
        return named


class ScheduleConfig(Strict):
    name: Literal["constant", "step", "multistep", "cosine", "linear"] = "constant"
    unit: Literal["epoch", "step"] = Field(
        "epoch",
        description="what the schedule counts: epochs (it steps at each epoch's end) or "
        "optimizer steps (milestones are steps; cosine and linear span the run's steps after "
        "the warm-up)",
    )
    step_epochs: int = Field(60, ge=1)
    milestones: list[int] = Field(
        default_factory=list,
        description="multistep: the epochs (unit: step: the steps) after which lr *= gamma",
    )
    gamma: float = Field(0.1, gt=0.0)
    min_lr_ratio: float = Field(
        0.0, ge=0.0, le=1.0,
        description="cosine and linear: the learning rate they end at, as a fraction of lr",
    )  # fmt: skip
    warmup_steps: int = Field(
        0, ge=0,
        description="linear warm-up: over the first N steps the learning rate rises from 1/N of "
        "the schedule's to all of it (per step; 0: none)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _milestones(self) -> ScheduleConfig:
        if self.name == "multistep" and not self.milestones:
            raise ValueError("the multistep schedule needs milestones (epochs, e.g. [150, 180])")
        if self.milestones != sorted(set(self.milestones)) or min(self.milestones, default=1) < 1:
            raise ValueError("milestones must be increasing epochs >= 1")
        if self.name == "step" and self.unit == "step":
            raise ValueError(
                "the step schedule counts epochs (step_epochs); with unit: step use multistep "
                "with milestones in steps"
            )
        return self


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="adam: L2 weight decay; adamw: decoupled weight decay"
    )
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="adam and adamw: the moving averages' coefficients"
    )
    weight_decay: float = Field(5e-4, ge=0.0)
    decay_1d_params: bool = Field(
        True,
        description="weight decay on 1-D parameters (biases, norm scales) too; false: on "
        "matrices and embeddings only",
    )
    grad_clip: float | None = Field(
        None, gt=0.0,
        description="the largest L2 norm of a peer's gradients together, clipped before each "
        "update (null: not clipped)",
    )  # fmt: skip
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="after")
    def _betas(self) -> OptimConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        return self


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps in all")
    eval_every: int = Field(1, ge=1, description="epochs between evaluations")
    init_from: str | None = Field(
        None,
        description="another run's folder: every student starts from its final weights "
        "(RUN/final/<peer>.pt; `dml-cluster train --init-from RUN`), with a fresh optimizer "
        "and schedule",
    )


class BusConfig(Strict):
    """How peers in different processes exchange predictions."""

    transport: Literal["local", "zmq", "torch"] = "local"
    encoding: Literal["float32", "float16", "bfloat16", "topk", "sampled"] = Field(
        "float32",
        description="what travels: every class's log-probability in a float type; topk: "
        "each row's k most likely classes (bus.k) as (index, log-probability) pairs, the rest of "
        "the mass spread evenly over the other classes; sampled: bus.samples class ids drawn "
        "from each row at the temperature its receivers distil at, with counts (an unbiased "
        "estimate of the distribution and of the distillation gradient)",
    )  # fmt: skip
    k: int | None = Field(None, description="topk: classes kept per row (1..C)")
    samples: int | None = Field(None, description="sampled: ids drawn per row (n >= 1)")
    sparse_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="topk, sampled: the float type of the sent log-probabilities"
    )
    timeout_s: float = Field(
        60.0, gt=0.0,
        description="steady state: how long a peer may take to answer a training step before "
        "the others stop, naming it",
    )  # fmt: skip
    startup_timeout_s: float = Field(
        600.0, gt=0.0,
        description="how long a peer may take at start-up (loading data, building and compiling "
        "its models: the first steps), around an evaluation and a checkpoint; also the process "
        "group's timeout. At least timeout_s",
    )  # fmt: skip
    address: str | None = Field(None, description="address to bind; default: this host's")
    ipc: bool = Field(False, description="zmq over ipc:// sockets (one node only)")
    port: int | None = Field(
        None, ge=1, le=65535,
        description="zmq: fixed inbox port, plus the process's local rank (for firewalls and "
        "network policies); default: any free port",
    )  # fmt: skip
    curve_keys: str | None = Field(
        None,
        description="zmq: folder of CURVE keys (`dml-cluster keys generate DIR`): encrypt the "
        "bus and accept only peers holding the cohort's keys",
    )
    window: int = Field(
        4, ge=1,
        description="zmq: how many steps a peer may run ahead of a peer it sends to (a teacher "
        "ahead of the slowest student); bounds what a peer buffers to window steps of each other",
    )  # fmt: skip

    @model_validator(mode="after")
    def _startup_covers_a_step(self) -> BusConfig:
        if self.startup_timeout_s < self.timeout_s:
            raise ValueError(
                f"startup_timeout_s ({self.startup_timeout_s:g}) must be at least timeout_s "
                f"({self.timeout_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _sparse_settings(self) -> BusConfig:
        if self.encoding == "topk" and self.k is None:
            raise ValueError("encoding topk needs k (the classes kept per row)")
        if self.encoding != "topk" and self.k is not None:
            raise ValueError(f"k is a setting of encoding topk, not of {self.encoding}")
        if self.k is not None and self.k <= 0:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.encoding == "sampled" and self.samples is None:
            raise ValueError("encoding sampled needs samples (the ids drawn per row)")
        if self.encoding != "sampled" and self.samples is not None:
            raise ValueError(f"samples is a setting of encoding sampled, not of {self.encoding}")
        if self.samples is not None and self.samples <= 0:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        return self

    @model_validator(mode="after")
    def _zmq_only(self) -> BusConfig:
        if self.transport == "torch" and (self.curve_keys or self.port):
            raise ValueError("port and curve_keys are zmq settings; the torch transport has none")
        return self


class OnSignalConfig(Strict):
    """What the cohort does on SIGTERM, the way Kubernetes and Slurm preempt a job."""

    save: bool = Field(
        True, description="every peer finishes its step and the cohort saves a checkpoint there"
    )
    grace_s: float = Field(
        60.0, gt=0.0,
        description="seconds the cohort has from SIGTERM to a saved checkpoint and exit (k8s "
        "render sets the pods' terminationGracePeriodSeconds from it)",
    )  # fmt: skip


class CheckpointConfig(Strict):
    """Cohort checkpoints (dml_cluster.checkpoint): saved every `every_steps` and at epoch ends."""

    enabled: bool = True
    every_steps: int | None = Field(
        500, ge=1, description="steps between mid-epoch checkpoints; null: at epoch ends only"
    )
    keep: int = Field(2, ge=1, description="how many complete checkpoints to keep (the newest)")
    resume: Literal["auto", "never"] = Field(
        "auto",
        description="auto: continue from the newest step complete for the whole cohort; "
        "never: start at step 0 (refused if the run folder already holds checkpoints)",
    )
    on_signal: OnSignalConfig = Field(
        OnSignalConfig(),
        description="SIGTERM (preemption by Kubernetes, Slurm): finish the step, save, exit",
    )


class TensorBoardConfig(Strict):
    """metrics.loggers: tensorboard: event files, one folder per peer."""

    dir: str | None = Field(None, description="event files in <dir>/<peer>/; default <run dir>/tb")


class WandbConfig(Strict):
    """metrics.loggers: wandb: one Weights & Biases run per peer, grouped by the cohort's run id."""

    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: written under `dir` only (upload later with `wandb sync`); online: "
        "sent to the W&B server (WANDB_API_KEY, WANDB_BASE_URL)",
    )
    project: str = Field("dml-cluster", min_length=1)
    entity: str | None = Field(None, description="team or user; default: the API key's")
    dir: str | None = Field(None, description="W&B's local files; default the run folder")


class MlflowConfig(Strict):
    """metrics.loggers: mlflow: a parent run for the cohort, a nested run per peer."""

    tracking_uri: str | None = Field(
        None,
        description="an MLflow server (http://...), or a local folder / file: URI (the file "
        "store); default <run dir>/mlruns",
    )
    experiment: str | None = Field(None, description="default: run.name")


class MetricsConfig(Strict):
    """How a run is watched: the Prometheus endpoint each peer process serves while it trains,
    and the experiment loggers (dml_cluster.metrics)."""

    enabled: bool = Field(True, description="false: no endpoint, no exporter, no cost")
    port: int = Field(
        9400, ge=0, le=65535,
        description="base port: a process serves port + its local rank; 0: any free port "
        "(the bound URL is written to <run dir>/metrics/<peer>.json). A busy default port "
        "falls back to a free one with a warning; a busy port set in the config is an error",
    )  # fmt: skip
    address: str = Field(
        "0.0.0.0",
        description="address the endpoint binds: 0.0.0.0 (every interface; what a Kubernetes "
        "pod needs, where Prometheus scrapes the pod's IP), :: (every interface, IPv6 too "
        "where the host allows), 127.0.0.1 (this machine only), or one interface's address",
    )
    smoothing: float = Field(
        0.9, ge=0.0, lt=1.0,
        description="training-batch values are an exponential moving average "
        "(new = s * old + (1 - s) * batch); 0: the last batch only",
    )  # fmt: skip
    stats_every: int = Field(
        10, ge=1,
        description="steps between the training batches whose accuracy, entropy and divergence "
        "the endpoint reads (its moving averages average those batches); samples, learning "
        "rate and bus counters are updated on every step, the losses and step times of the "
        "steps in between are read (in one transfer from the device) on those steps",
    )  # fmt: skip
    linger_s: float = Field(
        0.0, ge=0.0, description="keep serving this long after training ends (a final scrape)"
    )
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="experiment loggers, each an optional extra (pip install "
        "'dml-cluster[tensorboard]'): every run.log_every steps and every evaluation, one "
        "logger run per peer; independent of `enabled` (the Prometheus endpoint)",
    )
    tensorboard: TensorBoardConfig = TensorBoardConfig()
    wandb: WandbConfig = WandbConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("loggers")
    @classmethod
    def _once_each(cls, loggers: list[str]) -> list[str]:
        if len(set(loggers)) != len(loggers):
            raise ValueError("name each logger once")
        return loggers


class Config(Strict):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    cohort: CohortConfig
    method: MethodConfig = DMLConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    bus: BusConfig = BusConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, raw: Any) -> Any:
        """A `method` section without a name is the default method's."""
        method = raw.get("method") if isinstance(raw, dict) else None
        if isinstance(method, dict) and "name" not in method:
            return {**raw, "method": {"name": DEFAULT_METHOD, **method}}
        return raw

    @property
    def peers(self) -> list[NamedPeerConfig]:
        return self.cohort.resolved_peers()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """A short hash of what decides the trained numbers: the config minus where results go
        (run.name, run.out_dir, run.log_every), how the run is watched (run.progress_every_s,
        metrics), how it is checkpointed (checkpoint) and how peers are wired and placed (bus, all
        but its encoding and, for topk and sampled, k or samples and sparse_dtype;
        cohort.devices).

        Two configs with the same hash train the same weights, bitwise: a checkpoint of one
        resumes under the other (one process <-> torchrun, zmq <-> torch), so checkpoints, the
        cohort's start-up agreement, run ids, summaries, metrics and manifests all use it.
        """
        return config_hash(self.to_dict())


def hashed_view(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config dict (`Config.to_dict()`, or a run folder's recorded config) that
    its hash covers (see `Config.hash`)."""
    d = json.loads(json.dumps(config))  # a deep copy
    d["run"] = {k: v for k, v in d["run"].items() if k not in _NOT_HASHED_RUN}
    bus = d["bus"]  # float16 messages change the numbers; so do top-k's k and values
    d["bus"] = {"encoding": bus["encoding"]}
    if bus["encoding"] == "topk":
        d["bus"].update(k=bus["k"], sparse_dtype=bus["sparse_dtype"])
    if bus["encoding"] == "sampled":
        d["bus"].update(samples=bus["samples"], sparse_dtype=bus["sparse_dtype"])
    d["cohort"].pop("devices", None)  # where peers run (same hardware: the same numbers)
    for key, default in _REPLICA_DEFAULTS.items():  # one process per peer: hashed as before
        if d["cohort"].get(key) == default:
            d["cohort"].pop(key, None)
    for key in ("workers", "prefetch", "cache_dir"):  # how batches are read, not which
        d["data"].pop(key, None)
    for key in _TEXT_KEYS:  # unset text settings: image configs hash as they always did
        if d["data"].get(key) is None:
            d["data"].pop(key, None)
    optim = d.get("optim", {})
    for section, defaults in ((optim, _OPTIM_DEFAULTS),
                              (optim.get("schedule", {}), _SCHEDULE_DEFAULTS)):  # fmt: skip
        for key, default in defaults.items():
            if key in section and section[key] == default:
                section.pop(key)
    for section in ("metrics", "checkpoint"):
        d.pop(section, None)
    if d.get("train", {}).get("init_from") is None:  # unset: configs hash as before the key
        d.get("train", {}).pop("init_from", None)
    return d


def config_hash(config: dict[str, Any]) -> str:
    """The hash of a config dict: `Config.hash` of the config it describes. A recorded config of
    an earlier version (without keys added since) hashes as that version hashed it."""
    view = json.dumps(hashed_view(config), sort_keys=True)
    return hashlib.sha256(view.encode()).hexdigest()[:16]


def config_diff(
    old: dict[str, Any], new: dict[str, Any], shown: tuple[dict, dict] | None = None
) -> list[str]:
    """The keys whose values differ between two config dicts, one `key: old → new` each (dotted
    keys, list items by index; a key one side lacks is `(absent)` there), in key order. `shown`:
    fuller dicts of the same two configs whose values are shown where they have the key (a
    hashed view leaves out keys at their defaults: `cohort.replicas: 2 → 1`, not `→ (absent)`)."""
    a, b = _flat(old), _flat(new)
    full_a, full_b = (_flat(shown[0]), _flat(shown[1])) if shown else ({}, {})
    absent = "(absent)"
    return [
        f"{key}: {_shown(full_a.get(key, a.get(key, absent)))} → "
        f"{_shown(full_b.get(key, b.get(key, absent)))}"
        for key in sorted(a.keys() | b.keys())
        if a.get(key, absent) != b.get(key, absent)
    ]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, list) and tree:
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _shown(value: Any) -> str:
    return value if value == "(absent)" else json.dumps(value)


_REPLICA_DEFAULTS = {"replicas": 1, "shard": "ddp", "sync_batchnorm": False}
"""Cohort keys of data-parallel peers, left out of the hash at their defaults (the configs of
one process per peer hash as they did before replicas existed)."""
_NOT_HASHED_RUN = ("name", "out_dir", "log_every", "progress_every_s")
_TEXT_KEYS = ("train", "val", "tokenizer", "block_size", "val_tokens")
_OPTIM_DEFAULTS = {"betas": [0.9, 0.999], "decay_1d_params": True, "grad_clip": None}
_SCHEDULE_DEFAULTS = {"warmup_steps": 0, "unit": "epoch", "min_lr_ratio": 0.0}
"""Settings added after configs were first hashed: at these values, hashed as before them."""


def validation_error_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = list(first["loc"])
    method = loc[1] if loc[:1] == ["method"] and len(loc) > 1 else None
    if method is not None:
        del loc[1]  # the discriminator's tag: method.alpha, not method.dml.alpha
    key = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "union_tag_invalid" and loc == ["method"]:
        key = "method.name"
        problem = (
            f"unknown method {first['input'].get('name')!r} (known: {', '.join(method_names())})"
        )
    elif first["type"] == "extra_forbidden" and method is not None and len(loc) == 2:
        problem = unknown_key(str(method), loc[1])
    elif first["type"] == "extra_forbidden":
        problem = "unknown key" + did_you_mean(str(loc[-1]), known_keys(loc[:-1]))
    elif first["type"] == "missing":
        problem = "required key is missing"
    else:
        problem = first["msg"].removeprefix("Value error, ")
        if not isinstance(first["input"], dict | list):
            problem += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    return f"config error: {key}: {problem}" + (f" (and {more} more)" if more else "")


def known_keys(loc: list[Any]) -> list[str]:
    """The keys the config section at `loc` takes (list positions skipped); [] if unknown."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _section_model(field.annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _section_model(annotation: Any) -> Any:
    """The pydantic model inside a field's annotation (`X`, `X | None`, `list[X]`), if any."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def did_you_mean(key: str, known: list[str]) -> str:
    """' (did you mean X?)' for the closest known key, or ''."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides (values parsed as YAML; list items addressed by index)."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"config error: --set {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node: Any = raw
        keys = path.split(".")
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"config error: --set {path}: no list item {key}")
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(f"config error: --set {path}: {keys[depth - 1]} is not a section")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return raw


def parse_config(raw: Any) -> Config:
    """Validate a plain dict into a `Config`, raising one-line `ConfigError`s."""
    if not isinstance(raw, dict):
        raise ConfigError("config error: the config must be a YAML mapping")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(validation_error_line(err)) from None
    cfg.peers  # noqa: B018 - validates peer names
    check_encoding(cfg)
    check_teachers(cfg)
    check_names(cfg)
    check_replicas(cfg)
    return cfg


def check_replicas(cfg: Config) -> None:
    """Data-parallel peers: every replica reads an equal share of the batch, through DDP."""
    d, bs = cfg.cohort.replicas, cfg.data.batch_size
    if bs % d:
        raise ConfigError(
            f"config error: data.batch_size: {bs} does not divide into cohort.replicas {d} equal "
            f"shards (each replica reads batch_size / replicas samples): choose a multiple of {d}"
        )
    if cfg.cohort.shard == "fsdp":
        check_fsdp(cfg)


def check_fsdp(cfg: Config) -> None:
    """cohort.shard: fsdp needs replicas to shard over, and refuses the settings FSDP2 cannot
    combine with: channels_last (fully_shard needs contiguous parameters), and fp16, whose loss
    scaler over sharded gradients has not run here (the CPU has no fp16 training)."""
    if cfg.cohort.replicas == 1:
        raise ConfigError(
            "config error: cohort.shard: fsdp shards each peer over its replicas, and "
            "cohort.replicas is 1: set cohort.replicas to 2 or more, or leave cohort.shard: ddp"
        )
    if cfg.run.channels_last:
        raise ConfigError(
            "config error: cohort.shard: fsdp with run.channels_last: fully_shard needs "
            "contiguous parameters: leave run.channels_last false, or use cohort.shard: ddp"
        )
    if cfg.run.precision == "fp16":
        raise ConfigError(
            "config error: cohort.shard: fsdp with run.precision fp16 is not supported (its loss "
            "scaler over sharded gradients is untested): use run.precision bf16, or "
            "cohort.shard: ddp"
        )


def read_yaml(path: str | Path) -> Any:
    """The YAML mapping in `path` ({} when empty), or a one-line `ConfigError`."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config error: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config error: {path}: cannot read ({err})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"config error: {path}{line}: not valid YAML") from None
    if not isinstance(document, dict):
        raise ConfigError(
            f"config error: {path}: a config is a YAML mapping of sections (run:, data:, ...), "
            f"not a {type(document).__name__}"
        )
    return document


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment config, apply overrides, validate."""
    return parse_config(apply_overrides(read_yaml(path), overrides or []))


def check_teachers(cfg: Config) -> None:
    """Does the cohort fit the method? (teachers where needed, none where they would be ignored)."""
    name = cfg.method.name
    needs = family_of(name).teachers
    teachers = [p.name for p in cfg.peers if p.role == "teacher"]
    if len(teachers) == len(cfg.peers):
        raise ConfigError("config error: cohort.peers: every peer is a teacher; add a student")
    if needs == "none" and teachers:
        raise ConfigError(
            f"config error: method.name: {name!r} does not learn from teacher peers, but the "
            f"cohort has teachers {teachers}: use kd or dkd (method.peer_weight > 0 adds DML "
            "among students)"
        )
    if needs == "required" and not teachers:
        raise ConfigError(
            f"config error: cohort.peers: method {name!r} needs a teacher "
            "(a peer with role: teacher and a checkpoint)"
        )


SPARSE_ENCODINGS = ("topk", "sampled")
SPARSE_REFUSED = {
    "dml_js": "the Jensen-Shannon divergence needs every class of both distributions",
    "dkd": "DKD's non-target part needs every class's probability",
}
"""Methods that cannot learn from sparse rows (top-k or sampled), and why."""


def check_encoding(cfg: Config) -> None:
    """A sparse bus.encoding only with a method that learns from a sparse support; sampled
    ids only where each sender's receivers distil at one temperature."""
    encoding = cfg.bus.encoding
    if encoding not in SPARSE_ENCODINGS:
        return
    name = cfg.method.name
    why = SPARSE_REFUSED.get(name)
    if name == "dml_e" and cfg.method.ensemble == "logits":
        why = "dml_e's logit ensemble (method.ensemble: logits) needs every class's log-probability"
    if why is not None:
        raise ConfigError(
            f"config error: bus.encoding: {encoding} cannot be used with method {name!r}: {why} "
            "(use a dense encoding)"
        )
    if encoding == "sampled":
        draw_temperatures(cfg.method.read_temperatures())


def draw_temperatures(read: dict[str, set[float]]) -> dict[str, float]:
    """By sender role, the one temperature its receivers distil at (what `sampled` draws its
    ids at; 1 for a role nobody learns from), from a method's `read_temperatures`; a role read
    at several temperatures is one ConfigError line."""
    out = {"student": 1.0, "teacher": 1.0}
    for role, temperatures in read.items():
        if len(temperatures) > 1:
            listed = " and ".join(f"{t:g}" for t in sorted(temperatures))
            raise ConfigError(
                f"config error: bus.encoding: sampled draws each peer's ids at the temperature "
                f"its receivers distil at, but the {role}s' predictions are read at {listed} "
                "(use one temperature, or topk)"
            )
        out[role] = next(iter(temperatures), 1.0)
    return out


def peer_temperatures(cfg: Config) -> tuple[float, ...]:
    """By peer index, the temperature the `sampled` encoding draws its ids at."""
    by_role = draw_temperatures(cfg.method.read_temperatures())
    return tuple(by_role[p.role] for p in cfg.peers)


def check_names(cfg: Config) -> None:
    """Check model and dataset names against their registries."""
    from dml_cluster.data import dataset_names
    from dml_cluster.models import check_model_name, comes_trained

    keyed: dict[str, PeerConfig] = {
        f"cohort.peers.{i}" if cfg.cohort.peers else "cohort": peer
        for i, peer in enumerate(cfg.peers)
    }
    keyed |= {f"method.{k}": v for k, v in cfg.method if isinstance(v, PeerConfig)}
    for where, peer in keyed.items():  # building nothing: torchvision/timm names, factory imports
        key, model = f"{where}.model", peer.model
        try:
            check_model_name(model)
        except ConfigError as err:
            raise ConfigError(f"config error: {key}: {err}") from None
        check_model_kind(key, model, text=cfg.data.name == "text")
        if peer.role == "teacher" and not peer.checkpoint and not comes_trained(model):
            raise ConfigError(
                f"config error: {where}: a teacher needs a checkpoint (the trained weights to "
                f"load); {model!r} does not come with weights (an hf: folder with weights beside "
                "its config.json would)"
            )
    if cfg.data.name == "text":
        check_text_settings(cfg)
        return
    if cfg.data.name not in dataset_names():
        raise ConfigError(
            f"config error: data.name: unknown dataset {cfg.data.name!r} "
            f"(known: {', '.join(dataset_names())})"
        )
    check_data_settings(cfg)


def check_model_kind(key: str, model: str, *, text: bool) -> None:
    """Language models (token ids in: built-in ones, `hf:PATH`) for text data, image models for
    images. A user's factory (`module:function`) is taken as it comes: its first forward pass
    tells."""
    from dml_cluster.models import is_token_model

    token_model = is_token_model(model)
    if (":" in model and not token_model) or text == token_model:
        return
    if text:
        raise ConfigError(
            f"config error: {key}: {model!r} is not a language model; text data needs one "
            "(e.g. gpt)"
        )
    raise ConfigError(
        f"config error: {key}: {model!r} is a language model; it needs data.name: text"
    )


def check_text_settings(cfg: Config) -> None:
    """Text data (data.name: text) needs train, val and block_size, and takes none of the image
    settings."""
    for key in ("train", "val", "block_size"):
        if getattr(cfg.data, key) is None:
            raise ConfigError(f"config error: data.{key}: text data needs it")
    for key in ("root", "factory", "image_size", "normalize", "train_subset"):
        if getattr(cfg.data, key) is not None:
            raise ConfigError(f"config error: data.{key}: text data does not take it")
    if cfg.data.options:
        raise ConfigError("config error: data.options: text data does not take it")
    if cfg.data.label_fraction != 1.0:
        raise ConfigError("config error: data.label_fraction: text data has no labels to hide")
    if cfg.data.augment != AugmentConfig():
        raise ConfigError("config error: data.augment: text data is not augmented")
    for i, peer in enumerate(cfg.peers):  # a context shorter than the windows (built-in models)
        context = peer.args.get("block_size")
        if isinstance(context, int) and context < cfg.data.block_size:
            key = f"cohort.peers.{i}.args" if cfg.cohort.peers else "cohort.args"
            raise ConfigError(
                f"config error: {key}.block_size: the model's context ({context} positions) is "
                f"shorter than data.block_size {cfg.data.block_size}"
            )


def check_data_settings(cfg: Config) -> None:
    """data.factory / image_size / normalize only for the datasets that take them; the text
    settings only for text."""
    from dml_cluster.data import dataset_options

    for key in _TEXT_KEYS + ("cache_dir",):
        if getattr(cfg.data, key) is not None:
            raise ConfigError(
                f"config error: data.{key}: only text data (data.name: text) takes it"
            )
    accepted = dataset_options(cfg.data.name)
    for key in ("factory", "image_size", "normalize"):
        if getattr(cfg.data, key) is not None and key not in accepted:
            takers = "python" if key == "factory" else "imagefolder and python"
            raise ConfigError(
                f"config error: data.{key}: dataset {cfg.data.name!r} does not take it "
                f"(only {takers} do)"
            )
    if "factory" in accepted and cfg.data.factory is None:
        raise ConfigError(
            f"config error: data.factory: dataset {cfg.data.name!r} needs it: "
            "'package.module:function' returning (train, test, num_classes[, class_names])"
        )
    if cfg.data.factory is not None:
        from dml_cluster.importing import load_callable

        try:
            load_callable(cfg.data.factory)
        except ConfigError as err:
            raise ConfigError(f"config error: data.factory: {err}") from None
