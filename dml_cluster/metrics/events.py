"""What observers of a training run are told: one event per step, per evaluation, and the end.

The trainer builds a step's event once and hands the same object to every observer (the JSONL
run log, the Prometheus exporter, tests' recorders): losses as floats (one device sync for all),
learning rates, timings, a copy of the bus counters, and the batch statistics of every hosted
peer computed by one `cohort_batch_stats` call, on the steps some observer asks for them.
Observers read what they need from the event, never the trainer's internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from dml_cluster.bus.base import BusStats
from dml_cluster.devices import all_on
from dml_cluster.metrics.batch import PeerBatchStats, cohort_batch_stats

if TYPE_CHECKING:
    from dml_cluster.methods import LossParts


@dataclass(frozen=True)
class Losses:
    """A student's loss on one step, as floats."""

    total: float
    ce: float
    mimicry: float


@dataclass(frozen=True)
class PeerStep:
    """One hosted peer on one step."""

    lr: float  # learning rate of the peer's optimizer during the step
    losses: Losses | None  # None for a teacher (it does not learn)
    batch: PeerBatchStats | None  # None on steps no observer asked for statistics


@dataclass(frozen=True)
class StepEvent:
    """Handed to every observer after every training step."""

    step: int
    epoch: int
    batch_size: int
    step_seconds: float  # forward, exchange, backward, update
    exchange_seconds: float  # the step's exchanges on the bus, waiting included
    wait_seconds: float  # the part of exchange_seconds spent waiting for other peers
    bus: BusStats  # this process's bus counters after the step (a copy)
    peers: dict[int, PeerStep]  # by index, the peers this process hosts
    log_ps: dict[int, Tensor]  # every prediction received on the batch, by peer (not copied)
    target: Tensor  # the batch's labels, -1 where unlabelled (not copied)

    @property
    def has_batch_stats(self) -> bool:
        return any(p.batch is not None for p in self.peers.values())


@dataclass(frozen=True)
class EvalEvent:
    """Handed to every observer after an evaluation on the test set."""

    epoch: int  # epochs completed
    step: int  # steps completed
    report: dict[str, Any]  # evaluation.evaluate_cohort's report
    bus: BusStats  # this process's bus counters after the evaluation's exchange (a copy)
    elapsed_seconds: float  # the run's, earlier attempts included (metrics/progress.RunClock)


class Observer(Protocol):
    """Watches training (JSONL logs, Prometheus metrics) without taking part in it."""

    def wants_batch_stats(self, step: int) -> bool:
        """Whether this observer reads the batch statistics of `step` (they cost; the trainer
        computes them only on steps some observer asks for)."""
        ...

    def on_step(self, event: StepEvent) -> None: ...

    def on_eval(self, event: EvalEvent) -> None: ...

    def on_end(self, summary: dict[str, Any]) -> None: ...


def build_step_event(
    *,
    step: int,
    epoch: int,
    target: Tensor,
    parts: Mapping[int, LossParts],
    log_ps: dict[int, Tensor],
    lrs: Mapping[int, float],
    timings: tuple[float, float, float],
    bus: BusStats,
    with_batch_stats: bool,
) -> StepEvent:
    """The step's event for the peers in `lrs` (the hosted ones). `parts` are the hosted
    students' losses; `timings` are (step, exchange, wait) seconds. Statistics of the batch are
    computed for every hosted peer when `with_batch_stats`, else left out."""
    hosted = list(lrs)
    stats = cohort_batch_stats(log_ps, target, hosted) if with_batch_stats else {}
    losses = _losses_as_floats(parts)
    step_seconds, exchange_seconds, wait_seconds = timings
    return StepEvent(
        step=step,
        epoch=epoch,
        batch_size=len(target),
        step_seconds=step_seconds,
        exchange_seconds=exchange_seconds,
        wait_seconds=wait_seconds,
        bus=dataclasses.replace(bus),
        peers={i: PeerStep(lrs[i], losses.get(i), stats.get(i)) for i in hosted},
        log_ps=log_ps,
        target=target,
    )


def _losses_as_floats(parts: Mapping[int, LossParts]) -> dict[int, Losses]:
    """Every student's (total, ce, mimicry) as floats: on an accelerator in one transfer (one
    sync for all); on the CPU, where no sync exists, scalar by scalar (cheaper than a stack)."""
    if not parts:
        return {}
    order: Sequence[int] = list(parts)
    tensors = [t for i in order for t in (parts[i].total, parts[i].ce, parts[i].mimicry)]
    if tensors[0].device.type == "cpu":
        flat = [t.item() for t in tensors]
    else:  # the peers' GPUs may differ: stacked on the first student's
        with torch.no_grad():
            flat = torch.stack(all_on(tensors, tensors[0].device)).tolist()
    return {i: Losses(*flat[3 * n : 3 * n + 3]) for n, i in enumerate(order)}
