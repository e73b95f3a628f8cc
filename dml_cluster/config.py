"""Typed, validated experiment config: one YAML file per experiment, `--set a.b=c` overrides.

Everything is checked before anything starts; a problem is one `ConfigError` line naming the
key. This module knows nothing of torch: the names of models, datasets and methods are checked
against their registries by `check_names`, which imports them lazily.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dml_cluster.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Strict):
    """Where results go and how the run is seeded."""

    name: str = "dml"
    seed: int = 0
    out_dir: str = "runs"
    deterministic: bool = True
    threads: int = Field(1, ge=1, description="torch intra-op threads per peer process")
    log_every: int = Field(10, ge=1, description="steps between per-step log records")

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name


class AugmentConfig(_Strict):
    crop_padding: int = Field(0, ge=0)
    flip: bool | None = Field(None, description="None: flip where the dataset says it makes sense")


class DataConfig(_Strict):
    name: str = "digits"
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)
    augment: AugmentConfig = AugmentConfig()


class PeerConfig(_Strict):
    """One network of the cohort."""

    name: str | None = None
    model: str
    args: dict[str, Any] = Field(default_factory=dict)
    lr: float | None = Field(None, gt=0.0, description="overrides optim.lr for this peer")
    role: Literal["student", "teacher"] = Field(
        "student", description="a teacher is frozen: it publishes its predictions and never learns"
    )
    checkpoint: str | None = Field(
        None, description="teachers: the weights to load (a final/<peer>.pt or a checkpoint)"
    )

    @model_validator(mode="after")
    def _teacher_weights(self) -> PeerConfig:
        if self.role == "teacher" and not self.checkpoint:
            raise ValueError("a teacher needs a checkpoint (the trained weights to load)")
        if self.role == "student" and self.checkpoint:
            raise ValueError("checkpoint is for teachers (role: teacher); students start fresh")
        return self


class CohortConfig(_Strict):
    """The K peers: either `size` copies of `model`, or an explicit `peers` list."""

    size: int | None = Field(None, ge=1)
    model: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    peers: list[PeerConfig] | None = None
    update: Literal["simultaneous", "sequential"] = "simultaneous"

    @model_validator(mode="after")
    def _one_form(self) -> CohortConfig:
        if self.peers is None and (self.size is None or self.model is None):
            raise ValueError("give either cohort.peers or both cohort.size and cohort.model")
        if self.peers is not None:
            if self.model is not None:
                raise ValueError("give cohort.peers or cohort.model, not both")
            if len(self.peers) < 1:
                raise ValueError("cohort.peers must name at least one peer")
            if self.size is not None and self.size != len(self.peers):
                raise ValueError(
                    f"cohort.size is {self.size} but {len(self.peers)} peers are listed"
                )
        return self

    def resolved_peers(self) -> list[PeerConfig]:
        """The peer list with every peer named (name defaults to `<model>-<index>`)."""
        peers = self.peers or [PeerConfig(model=self.model, args=self.args)] * (self.size or 0)
        named = [
            p if p.name else p.model_copy(update={"name": f"{p.model}-{i}"})
            for i, p in enumerate(peers)
        ]
        names = [p.name for p in named]
        if len(set(names)) != len(names):
            raise ConfigError(f"config error: cohort.peers: peer names must be unique, got {names}")
        return named


class MethodConfig(_Strict):
    """How each peer learns from the others."""

    name: str = "dml"
    weight: float = Field(1.0, ge=0.0, description="weight of the mimicry term")
    temperature: float | None = Field(
        None, gt=0.0, description="None: the method's default (DML 1; KD, DKD, FitNets 4)"
    )
    unlabelled_mimicry: bool = Field(
        True, description="semi-supervised: mimicry on unlabelled samples too"
    )
    # distillation from teachers (methods kd, dkd, fitnets); formulas in methods/
    kd_weight: float = Field(0.9, ge=0.0, le=1.0, description="a in (1 - a) CE + a T^2 KL")
    peer_weight: float = Field(
        0.0, ge=0.0, description="kd/dkd: weight of DML links to fellow students (teacher + DML)"
    )
    alpha: float = Field(1.0, ge=0.0, description="dkd: weight of TCKD")
    beta: float = Field(8.0, ge=0.0, description="dkd: weight of NCKD")
    warmup_epochs: int = Field(20, ge=0, description="dkd: epochs of linear warm-up of DKD")
    hint_epochs: int = Field(1, ge=0, description="fitnets: epochs of stage 1 (hints only)")
    guided_layer: str | None = Field(None, description="fitnets: student module, e.g. blocks.1")
    hint_layer: str | None = Field(None, description="fitnets: teacher module, e.g. blocks.1")
    teacher: PeerConfig | None = Field(
        None, description="fitnets: the teacher run inside each student's process"
    )


class ScheduleConfig(_Strict):
    name: Literal["constant", "step", "cosine"] = "constant"
    step_epochs: int = Field(60, ge=1)
    gamma: float = Field(0.1, gt=0.0)


class OptimConfig(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: ScheduleConfig = ScheduleConfig()


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps in all")
    eval_every: int = Field(1, ge=1, description="epochs between evaluations")


class BusConfig(_Strict):
    """How peers in different processes exchange predictions."""

    transport: Literal["local", "zmq", "torch"] = "local"
    encoding: Literal["float32", "float16", "bfloat16"] = "float32"
    timeout_s: float = Field(60.0, gt=0.0)
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

    @model_validator(mode="after")
    def _zmq_only(self) -> BusConfig:
        if self.transport == "torch" and (self.curve_keys or self.port):
            raise ValueError("port and curve_keys are zmq settings; the torch transport has none")
        return self


class CheckpointConfig(_Strict):
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


class MetricsConfig(_Strict):
    """The Prometheus endpoint each peer process serves while it trains (dml_cluster.metrics)."""

    enabled: bool = Field(True, description="false: no endpoint, no exporter, no cost")
    port: int = Field(
        9400, ge=0, le=65535,
        description="base port: a process serves port + its local rank; 0: any free port "
        "(the bound URL is written to <run dir>/metrics/<peer>.json). A busy default port "
        "falls back to a free one with a warning; a busy port set in the config is an error",
    )  # fmt: skip
    address: str = Field("0.0.0.0", description="address the endpoint binds")
    smoothing: float = Field(
        0.9, ge=0.0, lt=1.0,
        description="training-batch values are an exponential moving average "
        "(new = s * old + (1 - s) * batch); 0: the last batch only",
    )  # fmt: skip
    linger_s: float = Field(
        0.0, ge=0.0, description="keep serving this long after training ends (a final scrape)"
    )


class Config(_Strict):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    cohort: CohortConfig
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    bus: BusConfig = BusConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @property
    def peers(self) -> list[PeerConfig]:
        return self.cohort.resolved_peers()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """A short hash of everything that decides the numbers (not where results go)."""
        d = self.to_dict()
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("out_dir", "name", "log_every")}
        del d["metrics"]  # watching a run does not change its numbers
        for local in ("address", "port", "timeout_s"):
            del d["bus"][local]  # may differ per node; the numbers do not depend on them
        # where the keys lie may differ per node; whether the bus is encrypted may not
        d["bus"]["curve_keys"] = d["bus"]["curve_keys"] is not None
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        problem = "unknown key"
    elif first["type"] == "missing":
        problem = "required key is missing"
    else:
        problem = f"{first['msg'].removeprefix('Value error, ')} (got {first['input']!r})"
    more = len(err.errors()) - 1
    return f"config error: {key}: {problem}" + (f" (and {more} more)" if more else "")


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
        raise ConfigError(_format(err)) from None
    cfg.peers  # noqa: B018 - validates peer names
    check_names(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment config, apply overrides, validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config error: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config error: {path}: cannot read ({err})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"config error: {path}{line}: not valid YAML") from None
    return parse_config(apply_overrides(raw, overrides or []))


def check_names(cfg: Config) -> None:
    """Check model, dataset and method names against their registries."""
    from dml_cluster.data import dataset_names
    from dml_cluster.methods import method_names
    from dml_cluster.models import model_names

    known_models = model_names()
    for i, peer in enumerate(cfg.peers):
        if peer.model not in known_models:
            key = f"cohort.peers.{i}.model" if cfg.cohort.peers else "cohort.model"
            raise ConfigError(
                f"config error: {key}: unknown model {peer.model!r} "
                f"(known: {', '.join(known_models)})"
            )
    if cfg.data.name not in dataset_names():
        raise ConfigError(
            f"config error: data.name: unknown dataset {cfg.data.name!r} "
            f"(known: {', '.join(dataset_names())})"
        )
    if cfg.method.name not in method_names():
        raise ConfigError(
            f"config error: method.name: unknown method {cfg.method.name!r} "
            f"(known: {', '.join(method_names())})"
        )
    from dml_cluster.methods import check_method

    check_method(cfg)
