"""What a method is: a loss over a student's logits, the labels and what it sees of the cohort."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from dml_cluster.method_config.base import MethodSettings


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
    """

    peer: int
    peers: Sequence[Tensor]
    teachers: Sequence[Tensor]
    progress: Progress

    @classmethod
    def of(
        cls, peers: Sequence[Tensor] = (), teachers: Sequence[Tensor] = (), epoch: int = 0
    ) -> StepView:
        """A view for calling a method by hand (tests, notebooks): peer 0, one step per epoch."""
        return cls(0, list(peers), list(teachers), Progress(epoch, epoch, 1))


class Method(ABC):
    """Base of every method: a loss, plus two optional hooks.

    `extra_modules` gives the modules a method trains next to a student's model (the peer
    builder adds their parameters to the student's optimizer and checkpoints save them);
    `begin_step` sees each training step's batch once, before any student's loss.
    Which teachers a method needs is a config matter (`MethodSettings.teachers`).
    """

    def __init__(self, cfg: MethodSettings) -> None:
        self.cfg = cfg

    def extra_modules(
        self, peer: int, model: nn.Module, input_shape: tuple[int, int, int], classes: int
    ) -> dict[str, nn.Module]:
        """Modules student `peer` trains next to `model`, on its device (default: none).

        Called once per hosted student by `cohort.build_peer`, with torch's RNG seeded by
        (run.seed, peer), so a module starts alike in every layout.
        """
        return {}

    def begin_step(self, x: Tensor) -> None:  # noqa: B027 - an optional hook
        """Called once per training step with its batch, before the students' losses."""

    @abstractmethod
    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        """The loss a student steps on, and its parts for logging."""
