"""The `search:` section of a search config, and the config file itself: a train config without
a `cohort` (the search builds each round's cohort: the teacher and the candidates) plus
`search:`. Torch-free, like `dml_cluster.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from dml_cluster.config import (
    Config,
    SubsetConfig,
    apply_overrides,
    parse_config,
    read_yaml,
    validation_error_line,
)
from dml_cluster.errors import ConfigError
from dml_cluster.schema import Strict
from dml_cluster.search.space import OPS, SKIPS, SearchSpace


class SpaceSettings(Strict):
    """The search space: the base plan (one channel count and stride per block) and the choices
    of every decision."""

    channels: list[int] = Field([16, 24, 32, 48, 64], min_length=1)
    strides: list[int] = Field([1, 2, 2, 1, 2], min_length=1)
    stem: int = Field(16, ge=1, description="stem channels (a 3x3 conv, stride 1)")
    head: int = Field(128, ge=1, description="head channels (a 1x1 conv before the pool)")
    op: list[Literal["conv", "dwsep", "mbconv"]] = Field(list(OPS), min_length=1)
    kernel: list[int] = Field([3, 5], min_length=1)
    expansion: list[int] = Field([1, 3, 6], min_length=1)
    se: list[float] = Field([0.0, 0.25], min_length=1)
    skip: list[Literal["identity", "none"]] = Field(list(SKIPS), min_length=1)
    layers: list[int] = Field([1, 2, 3], min_length=1)
    width: list[float] = Field([0.5, 0.75, 1.0, 1.25], min_length=1)

    @field_validator("channels", "strides", "expansion", "layers")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError(f"every value must be a positive int, got {values}")
        return values

    @field_validator("kernel")
    @classmethod
    def _odd(cls, values: list[int]) -> list[int]:
        if any(v < 1 or v % 2 == 0 for v in values):
            raise ValueError(f"kernels must be odd positive ints, got {values}")
        return values

    @field_validator("se")
    @classmethod
    def _ratio(cls, values: list[float]) -> list[float]:
        if any(not 0.0 <= v < 1.0 for v in values):
            raise ValueError(f"SE ratios must be in [0, 1), got {values}")
        return values

    @field_validator("width")
    @classmethod
    def _width(cls, values: list[float]) -> list[float]:
        if any(v <= 0 for v in values):
            raise ValueError(f"width multipliers must be > 0, got {values}")
        return values

    @model_validator(mode="after")
    def _plan(self) -> SpaceSettings:
        if len(self.channels) != len(self.strides):
            raise ValueError(
                f"{len(self.channels)} channels but {len(self.strides)} strides "
                "(one of each per block)"
            )
        return self

    def build(self) -> SearchSpace:
        d = self.model_dump()
        return SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class ControllerSettings(Strict):
    """How architectures are proposed; `random` is the baseline."""

    name: Literal["ppo", "reinforce", "random"] = "ppo"
    hidden: int = Field(64, ge=1, description="LSTM width")
    lr: float = Field(0.02, gt=0.0, description="Adam learning rate of the policy")
    entropy: float = Field(0.01, ge=0.0, description="entropy bonus weight")
    logit_bound: float = Field(
        2.5, ge=0.0, description="logits = b tanh(logits / b) (ENAS; keeps exploring); 0: off"
    )
    clip: float = Field(0.2, gt=0.0, lt=1.0, description="PPO ratio clip")
    ppo_epochs: int = Field(4, ge=1, description="PPO passes over a round's samples")
    baseline_decay: float = Field(0.9, ge=0.0, lt=1.0, description="moving-average baseline")
    seed: int | None = Field(None, description="default: run.seed")


class CostSettings(Strict):
    """LAT of the reward ACC * (LAT / target) ** weight."""

    metric: Literal["latency", "flops"] = Field(
        "latency",
        description="latency: median ms of timed forward passes of a batch on the search's "
        "device; flops: MFLOPs of one sample's forward (deterministic, machine-independent)",
    )
    target: float = Field(..., gt=0.0, description="in ms (latency) or MFLOPs (flops)")
    weight: float = Field(-0.07, description="w in (LAT / target) ** w (MnasNet: -0.07)")
    batch: int = Field(64, ge=1, description="latency: the batch timed")
    repeats: int = Field(20, ge=1, description="latency: timed passes (the median is used)")
    warmup: int = Field(3, ge=0, description="latency: untimed passes first")


class TeacherSettings(Strict):
    """The frozen teacher the candidates distil from (reward kd) and the winner retrains with."""

    model: str
    args: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str


class RetrainSettings(Strict):
    """`--retrain`: the best architecture trained fully with KD from the teacher."""

    epochs: int | None = Field(None, ge=1, description="default: the config's train.epochs")
    seeds: list[int] = Field([0], min_length=1)


class SearchSettings(Strict):
    space: SpaceSettings = SpaceSettings()
    controller: ControllerSettings = ControllerSettings()
    teacher: TeacherSettings
    reward: Literal["kd", "ce"] = Field(
        "kd", description="kd: candidates learn from the teacher (AKD); ce: alone (NAS, then KD)"
    )
    rounds: int = Field(10, ge=1)
    candidates: int = Field(4, ge=1, description="candidates sampled per round")
    proxy_epochs: int = Field(1, ge=1, description="epochs of a candidate's proxy training")
    cost: CostSettings
    proxy_subset: SubsetConfig = Field(
        SubsetConfig(fraction=0.8, seed=0),
        description="what candidates train on when the config has no data.train_subset",
    )
    validation_per_class: int | None = Field(
        None, ge=1,
        description="the validation split: the training images the candidates do not train "
        "on (the subset's complement), at most this many of each class (default: all)",
    )  # fmt: skip
    top: int = Field(10, ge=1, description="rows of report.md's table")
    retrain: RetrainSettings = RetrainSettings()


class SearchConfig(Strict):
    """A whole search config: the search section and the train config its rounds start from."""

    search: SearchSettings
    base: dict[str, Any]

    def round_config(self, peers: list[dict[str, Any]], overrides: dict[str, Any]) -> Config:
        """The train config of a cohort: `base` with `peers` and the given sections replaced."""
        raw = {**self.base, "cohort": {"peers": peers}, **overrides}
        return parse_config(raw)


def parse_search_config(raw: Any) -> SearchConfig:
    """Validate a search config; a problem is one ConfigError line naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError("config error: the config must be a YAML mapping")
    if "search" not in raw:
        raise ConfigError("config error: search: required key is missing (a search config)")
    if "cohort" in raw:
        raise ConfigError(
            "config error: cohort: a search builds its cohorts (search.teacher and the "
            "candidates); remove the cohort section"
        )
    base = {k: v for k, v in raw.items() if k != "search"}
    try:
        search = SearchSettings.model_validate(raw["search"])
    except ValidationError as err:
        raise ConfigError(
            validation_error_line(err).replace("config error: ", "config error: search.", 1)
        ) from None
    method = (base.get("method") or {}).get("name", "kd") if search.reward == "kd" else None
    if method is not None and method != "kd":
        raise ConfigError(
            f"config error: method.name: reward kd distils with method kd, got {method!r}"
        )
    if search.reward == "kd" and (base.get("method") or {}).get("peer_weight", 0):
        raise ConfigError(
            "config error: method.peer_weight: candidates must not learn from each other "
            "(it would change each other's reward); use 0"
        )
    cfg = SearchConfig(search=search, base=base)
    teacher = {"name": "teacher", **search.teacher.model_dump(), "role": "teacher"}
    probe = {"name": "probe", "model": "mlp"}
    cfg.round_config([teacher, probe], {"method": {"name": "kd", **_kd_settings(base)}})
    return cfg


def _kd_settings(base: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (base.get("method") or {}).items() if k != "name"}


def load_search_config(path: str | Path, overrides: list[str] | None = None) -> SearchConfig:
    """Read a search config (YAML), apply `--set` overrides, validate."""
    return parse_search_config(apply_overrides(read_yaml(path), overrides or []))
