"""Learning methods: what a student minimises given its logits, labels and the cohort's predictions.

One small file per family; each method registers itself under a name used as `method.name` in
the config. A method is a callable `(logits, target, view) -> LossParts`, where the `StepView`
keeps fellow students' predictions (`peers`) apart from teachers' (`teachers`) and says where
training is (`progress`, for warm-ups and stages). Teachers never call a method: they are frozen.

- `dml`, `dml_js`, `dml_e`, `independent` (dml.py): students learn from each other only.
- `kd` (kd.py): Hinton KD from the teachers; with `peer_weight` > 0 also DML among students.
- `dkd` (dkd.py): decoupled KD (TCKD + NCKD) from the teachers, linear warm-up.
- `fitnets` (fitnets.py): hints then KD, the teacher inside the student's process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from torch import Tensor

from dml_cluster.config import Config, MethodConfig
from dml_cluster.errors import ConfigError

if TYPE_CHECKING:
    from dml_cluster.cohort import Peer


@dataclass(frozen=True)
class LossParts:
    """The total loss a student steps on, and its parts for logging (`extra`: kd, tckd, hint...)."""

    total: Tensor
    ce: Tensor
    mimicry: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """Where training is: 0-based epoch, global step, steps per epoch."""

    epoch: int
    step: int
    steps_per_epoch: int


@dataclass(frozen=True)
class StepView:
    """What a student sees at a step besides its own logits and the labels.

    `peers` and `teachers` are log-probabilities at T = 1 (what the bus carries), detached.
    `x` is the batch, for methods that run networks of their own on it (FitNets' teacher).
    """

    peer: int
    peers: Sequence[Tensor]
    teachers: Sequence[Tensor]
    progress: Progress
    x: Tensor | None = None

    @classmethod
    def of(
        cls,
        peers: Sequence[Tensor] = (),
        teachers: Sequence[Tensor] = (),
        epoch: int = 0,
        x: Tensor | None = None,
    ) -> StepView:
        """A view for calling a method by hand (tests, notebooks): peer 0, one step per epoch."""
        return cls(0, list(peers), list(teachers), Progress(epoch, epoch, 1), x)


class Method(ABC):
    """Base of every method: a loss, plus optional per-student set-up (`attach`).

    `teachers` declares what the method needs from the cohort's teacher peers: "none" (they
    would be ignored, so a cohort with teachers is refused), "required" (at least one).
    """

    teachers: ClassVar[Literal["none", "required"]] = "none"
    default_temperature: ClassVar[float] = 1.0

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.temperature = cfg.temperature or self.default_temperature

    def attach(  # noqa: B027 - an optional hook
        self, peer: Peer, cfg: Config, input_shape: tuple[int, int, int], classes: int
    ) -> None:
        """Called once per hosted student before training (FitNets adds a regressor here)."""

    def check(self, cfg: Config) -> None:  # noqa: B027 - an optional hook
        """Method-specific config checks; raise ConfigError."""

    @abstractmethod
    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        """The loss a student steps on, and its parts for logging."""


_METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        _METHODS[name] = cls
        return cls

    return add


def method_names() -> list[str]:
    return sorted(_METHODS)


def build_method(cfg: MethodConfig) -> Method:
    if cfg.name not in _METHODS:
        raise ConfigError(
            f"config error: method.name: unknown method {cfg.name!r} "
            f"(known: {', '.join(method_names())})"
        )
    return _METHODS[cfg.name](cfg)


def check_method(cfg: Config) -> None:
    """Does the cohort fit the method? (teachers where needed, none where they would be ignored)."""
    name = cfg.method.name
    cls = _METHODS[name]
    teachers = [p.name for p in cfg.peers if p.role == "teacher"]
    if len(teachers) == len(cfg.peers):
        raise ConfigError("config error: cohort.peers: every peer is a teacher; add a student")
    if cls.teachers == "none" and teachers:
        raise ConfigError(
            f"config error: method.name: {name!r} does not learn from teacher peers, but the "
            f"cohort has teachers {teachers}: use kd or dkd (method.peer_weight > 0 adds DML "
            "among students)"
        )
    if cls.teachers == "required" and not teachers:
        raise ConfigError(
            f"config error: cohort.peers: method {name!r} needs a teacher "
            "(a peer with role: teacher and a checkpoint)"
        )
    cls(cfg.method).check(cfg)


from dml_cluster.methods import dkd, dml, fitnets, kd  # noqa: E402,F401  (register the methods)
