"""What a method is: a loss over a student's logits, the labels and what it sees of the cohort.

The interface, in one place:

- A method *declares* what it reads beyond its student's logits (`Method.needs`, a `Needs`):
  outputs of named modules of its student (`features`), a frozen teacher network run in the
  student's process (`teacher`, with `teacher_features`), the batch's sample indices
  (`sample_ids`). It never builds, loads or hooks anything itself.
- The trainer provides all of it through one object per student and step, the `StepView`
  handed to `Method.__call__`: the other peers' predictions, the declared features (with
  autograd), the teacher's logits and features (without), the indices, the student's own extra
  modules, and where training is. A method keeps no per-step state, so there is no hook to
  call first and nothing a new method can call in the wrong order.
- Modules a method trains next to a student (FitNets' regressor) come from
  `Method.extra_modules`, called once per student at build time with the declared features'
  shapes (`Shapes`); the peer builder optimises and checkpoints them, and each step's view hands
  them back (`StepView.modules`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from dml_cluster.method_config.base import MethodSettings
from dml_cluster.schema import PeerConfig
from dml_cluster.sparse_rows import Rows, Sampled, TopK


@dataclass(frozen=True)
class LossParts:
    """The total loss a student steps on, and its two parts the run log, the metrics and the
    loggers record: the cross-entropy and `distill`, the term that learns from other networks
    (DML's mimicry of fellow students, KD's or DKD's term, FitNets' hint or KD stage, AT's
    attention term; with `peer_weight`, a teacher method's term includes its DML part)."""

    total: Tensor
    ce: Tensor
    distill: Tensor


@dataclass(frozen=True)
class Progress:
    """Where training is: 0-based epoch, global step, steps per epoch."""

    epoch: int
    step: int
    steps_per_epoch: int


@dataclass(frozen=True)
class Predictions:
    """Another peer's predictions on the step's rows, as a method reads them.

    A row is a sample (a token position, for sequence models). `encoding` says how the values
    are held: "dense" is every class's log-probability at T = 1, [rows, classes], detached;
    "topk" holds `TopK` rows (dml_cluster/sparse_rows.py: each row's k most likely classes, the
    rest of the mass spread evenly) and "sampled" `Sampled` rows (ids drawn at the receivers'
    temperature, with counts), read through `sparse_rows()` by the methods that learn from a
    sparse support (losses_sparse.py). `mask` ([rows], bool) marks the rows that carry a
    prediction (None: every row). Read dense ones through `log_probs()`, which refuses what a
    dense-reading method cannot use rather than reading it wrongly.
    """

    values: Tensor | Rows
    mask: Tensor | None = None
    encoding: Literal["dense", "topk", "sampled"] = "dense"

    @classmethod
    def of(cls, received: Tensor | Rows) -> Predictions:
        """What the bus delivered, as predictions of its encoding."""
        if isinstance(received, TopK):
            return cls(received, encoding="topk")
        if isinstance(received, Sampled):
            return cls(received, encoding="sampled")
        return cls(received)

    def sparse_rows(self) -> Rows:
        """The sparse rows (encoding "topk" or "sampled"), every row predicted."""
        if self.encoding == "dense" or self.mask is not None:
            raise ValueError("these predictions are not sparse rows covering every row")
        return self.values

    def log_probs(self) -> Tensor:
        """The dense [rows, classes] log-probabilities, every row predicted."""
        if self.encoding != "dense":
            raise ValueError(
                f"these predictions are {self.encoding} rows (bus.encoding); this method reads "
                "every class's probability"
            )
        if self.mask is not None:
            raise ValueError(
                "these predictions cover only the rows of their mask; this method reads every "
                "row (select the masked rows first)"
            )
        return self.values


def dense(predictions: Sequence[Predictions]) -> list[Tensor]:
    """The dense log-probabilities of each of `predictions` (`Predictions.log_probs`)."""
    return [p.log_probs() for p in predictions]


def sparse(predictions: Sequence[Predictions]) -> list[Rows] | None:
    """The sparse rows of each of `predictions` when they are sparse (a cohort's predictions
    share one encoding), else None."""
    if not predictions or predictions[0].encoding == "dense":
        return None
    return [p.sparse_rows() for p in predictions]


@dataclass(frozen=True)
class Needs:
    """What a method reads beyond its student's logits, the labels and the cohort's predictions.

    `features`: the student's modules (names as in `model.named_modules()`) whose outputs it
    reads, with autograd, on the student's training forward, each mapped to the setting that
    named it (a missing module is a config error naming that setting). `teacher`: a frozen
    network (loaded from its checkpoint) that runs in the student's process, in eval mode without
    a graph, on the same batch; `teacher_features` its modules, read likewise. `sample_ids`: the
    dataset indices of the batch's rows.
    """

    features: Mapping[str, str] = field(default_factory=dict)
    teacher: PeerConfig | None = None
    teacher_features: Mapping[str, str] = field(default_factory=dict)
    sample_ids: bool = False


@dataclass(frozen=True)
class Shapes:
    """What a method's extra modules are sized from: the input's (C, H, W), the number of
    classes, and the shape of each declared feature on a 2-sample probe batch."""

    input_shape: tuple[int, int, int]
    classes: int
    features: Mapping[str, torch.Size] = field(default_factory=dict)
    teacher_features: Mapping[str, torch.Size] = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherOutputs:
    """The in-process teacher's outputs on the step's batch: logits (in the run's precision, as
    the teacher computed them) and the declared features; no graph."""

    logits: Tensor
    features: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StepView:
    """Everything a student's method reads at a step besides its own logits and the labels.

    `peers` (fellow students) and `teachers` (teacher peers on the bus) are `Predictions`;
    `features`, `teacher` and `sample_ids` are what `Method.needs` declared (empty / None when
    not declared); `modules` are the student's extra modules (`Method.extra_modules`). Everything
    is on the student's device. `labelled`: what a mean over the labelled rows divides by, as
    losses' `count` (a data-parallel peer's replica: the labelled rows of the peer's whole batch
    over its replicas, so that the replicas' averaged gradients are the whole batch's mean;
    None: this batch's own count).
    """

    peer: int
    peers: Sequence[Predictions]
    teachers: Sequence[Predictions]
    progress: Progress
    features: Mapping[str, Tensor] = field(default_factory=dict)
    teacher: TeacherOutputs | None = None
    sample_ids: Tensor | None = None
    modules: Mapping[str, nn.Module] = field(default_factory=dict)
    labelled: Tensor | None = None

    @classmethod
    def of(
        cls, peers: Sequence[Tensor] = (), teachers: Sequence[Tensor] = (), epoch: int = 0
    ) -> StepView:
        """A view for calling a method by hand (tests, notebooks): peer 0, one step per epoch,
        dense predictions."""
        return cls(
            0,
            [Predictions(p) for p in peers],
            [Predictions(t) for t in teachers],
            Progress(epoch, epoch, 1),
        )


class Method(ABC):
    """Base of every method: a loss (`__call__`), what it reads (`needs`), and the modules it
    trains next to a student (`extra_modules`). Which teacher *peers* a method needs is a config
    matter (`MethodSettings.teachers`); an in-process teacher is a `Needs.teacher`."""

    def __init__(self, cfg: MethodSettings) -> None:
        self.cfg = cfg

    @property
    def needs(self) -> Needs:
        """What this method reads beyond logits (default: nothing)."""
        return Needs()

    def extra_modules(self, peer: int, shapes: Shapes) -> dict[str, nn.Module]:
        """Modules student `peer` trains next to its model, on the CPU (default: none); the peer
        builder moves them to the student's device.

        Called once per hosted student at build time, with torch's RNG seeded by
        (run.seed, peer), so a module starts alike in every layout. Also where a method refuses
        shapes it cannot use: a `ConfigError` here is the run's one-line error, before anything
        is written.
        """
        return {}

    @abstractmethod
    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        """The loss a student steps on, and its parts for logging."""
