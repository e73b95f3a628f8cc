"""What observers of a training run are told: one event per step, per evaluation, and the end.

The trainer builds a step's event once and hands the same object to every observer (the JSONL
run log, the Prometheus exporter, the progress display, tests' recorders): learning rates, a copy
of the bus counters, the students' losses and the step's times, and the batch statistics of every
hosted peer computed by one `cohort_batch_stats` call, on the steps some observer asks for them.
Observers read what they need from the event, never the trainer's internals.

Nothing in an event is read from the device until an observer asks: the losses stay device
tensors until `peers` (or `losses`) is read, then come over in one transfer for all students; the
step's times are device events until a `*_seconds` field is read (`dml_cluster.timing`). An
observer reads them on its reporting steps only, so a step that reports nothing never waits for
the device (on the CPU, where nothing waits, reading is merely cheap).

Predictions stay as the bus delivered them (`received`): under a sparse `bus.encoding` (top-k,
sampled rows) a step makes no dense [rows, C] tensor of them unless something reads `log_ps`,
the densified view: the batch statistics do, on the steps some observer asks for them (the run
log's `run.log_every` steps, the exporter's `metrics.stats_every` ones); the progress line's
running cross-entropy reads each row's log-probability at its label from the sparse support.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from dml_cluster.bus.base import BusStats
from dml_cluster.devices import all_on
from dml_cluster.metrics.batch import PeerBatchStats, cohort_batch_stats
from dml_cluster.sparse_rows import Rows, densify
from dml_cluster.timing import EXCHANGE, FORWARD, UPDATE, KnownTimes, StepTimes

if TYPE_CHECKING:
    from dml_cluster.methods import LossParts


@dataclass(frozen=True)
class Losses:
    """A student's loss on one step, as floats (`distill`: `LossParts.distill`)."""

    total: float
    ce: float
    distill: float


@dataclass(frozen=True)
class PeerStep:
    """One hosted peer on one step."""

    lr: float  # learning rate of the peer's optimizer during the step
    losses: Losses | None  # None for a teacher (it does not learn)
    batch: PeerBatchStats | None  # None on steps no observer asked for statistics


class StepEvent:
    """Handed to every observer after every training step (see the module's docstring for what
    is read from the device, and when)."""

    def __init__(
        self,
        *,
        step: int,
        epoch: int,
        target: Tensor,
        log_ps: Mapping[int, Tensor | Rows],
        lrs: Mapping[int, float],
        parts: Mapping[int, LossParts],
        times: StepTimes,
        bus: BusStats,
        stats: Mapping[int, PeerBatchStats] | None = None,
        encoded: Mapping[int, Mapping[str, Tensor]] | None = None,
    ) -> None:
        self.step, self.epoch = step, epoch
        self.batch_size = target.shape[0]
        self.target = target  # the batch's labels, -1 where unlabelled (not copied)
        # every prediction received on the batch, by peer, as the bus delivered it (not copied):
        # [B, C] log-probabilities, or a sparse encoding's rows (`log_ps` densifies them)
        self.received = log_ps
        self.lrs = lrs  # by hosted peer: its optimizer's learning rate during the step
        self.parts = parts  # the hosted students' losses, device tensors (teachers: none)
        self.times = times
        self.bus = bus  # this process's bus counters after the step (a copy)
        self.stats = stats  # the hosted peers' batch statistics, or None (not asked for)
        # sparse encodings: by peer, what its rows kept (device scalars until `encoding` reads)
        self.encoded = encoded or {}

    @classmethod
    def of(
        cls,
        *,
        step: int,
        epoch: int,
        batch_size: int,
        step_seconds: float,
        peers: dict[int, PeerStep],
        exchange_seconds: float = 0.0,
        wait_seconds: float = 0.0,
        bus: BusStats | None = None,
        log_ps: dict[int, Tensor] | None = None,
        target: Tensor | None = None,
    ) -> StepEvent:
        """An event from values already on the host (tests, a replay): `peers` as observers
        read them; the step's time all exchange and update (no forward)."""
        phases = {FORWARD: 0.0, EXCHANGE: exchange_seconds, UPDATE: step_seconds - exchange_seconds}
        stats = {i: p.batch for i, p in peers.items() if p.batch is not None}
        event = cls(
            step=step, epoch=epoch, target=torch.zeros(0) if target is None else target,
            log_ps=log_ps or {}, lrs={i: p.lr for i, p in peers.items()}, parts={},
            times=KnownTimes(step_seconds, phases, wait_seconds), bus=bus or BusStats(),
            stats=stats or None,
        )  # fmt: skip
        event.batch_size = batch_size
        event.__dict__["peers"] = peers  # the cached properties, given
        event.__dict__["losses"] = {i: p.losses for i, p in peers.items() if p.losses}
        return event

    @cached_property
    def log_ps(self) -> dict[int, Tensor]:
        """Every prediction received on the batch as [B, C] log-probabilities: sparse rows
        densified (sparse_rows.densify: the rest of the mass spread evenly), on first read only:
        at a large C the very tensor a sparse encoding avoids, so read on reporting steps."""
        return {i: p if isinstance(p, Tensor) else densify(p) for i, p in self.received.items()}

    @property
    def has_batch_stats(self) -> bool:
        return self.stats is not None

    @cached_property
    def losses(self) -> dict[int, Losses]:
        """Every hosted student's losses as floats (one transfer; a sync on an accelerator)."""
        return losses_as_floats([self.parts])[0]

    @cached_property
    def encoding(self) -> dict[int, dict[str, float]]:
        """Sparse encodings, by peer whose rows this process read: `kept_mass` (the kept or
        drawn classes' probability mass, mean over rows), for sampled rows `distinct_ids` (per
        row, beside bus.samples draws); empty for a dense encoding. One transfer for all."""
        if not self.encoded:
            return {}
        keyed = [(i, name) for i, d in self.encoded.items() for name in d]
        scalars = [self.encoded[i][name].float() for i, name in keyed]
        values = torch.stack(all_on(scalars, scalars[0].device)).cpu().tolist()
        out: dict[int, dict[str, float]] = {}
        for (i, name), value in zip(keyed, values, strict=True):
            out.setdefault(i, {})[name] = value
        return out

    @cached_property
    def peers(self) -> dict[int, PeerStep]:
        """By index, the peers this process hosts (reads the losses: a reporting step's)."""
        losses, stats = self.losses, self.stats or {}
        return {i: PeerStep(lr, losses.get(i), stats.get(i)) for i, lr in self.lrs.items()}

    @property
    def step_seconds(self) -> float:
        """Forward, exchange, backward, update (device time on an accelerator)."""
        return self.times.step_seconds

    @property
    def exchange_seconds(self) -> float:
        """The step's exchanges on the bus, waiting included."""
        return self.times.exchange_seconds

    @property
    def wait_seconds(self) -> float:
        """The part of the exchanges spent waiting for other peers (host clock)."""
        return self.times.wait_seconds


@dataclass(frozen=True)
class EvalEvent:
    """Handed to every observer after an evaluation on the test set."""

    epoch: int  # epochs completed
    step: int  # steps completed
    report: dict[str, Any]  # evaluation.evaluate_cohort's report
    bus: BusStats  # this process's bus counters after the evaluation's exchange (a copy)
    elapsed_seconds: float  # the run's, earlier attempts included (metrics/progress.RunClock)


class Observer(Protocol):
    """Watches training (JSONL logs, Prometheus metrics) without taking part in it.

    `on_step` runs after every step: it must not read the event's losses or times (device
    values) on a step it does not report (see the module's docstring)."""

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
    log_ps: Mapping[int, Tensor | Rows],
    lrs: Mapping[int, float],
    times: StepTimes,
    bus: BusStats,
    with_batch_stats: bool,
    encoded: Mapping[int, Mapping[str, Tensor]] | None = None,
) -> StepEvent:
    """The step's event for the peers in `lrs` (the hosted ones). `parts` are the hosted
    students' losses; `log_ps` the predictions as the bus delivered them (dense, or sparse
    rows). Statistics of the batch are computed for every hosted peer when `with_batch_stats`
    (sparse rows densified, then one copy of the predictions to the host), else left out.
    `encoded`: what each peer's sparse rows kept (`StepEvent.encoding`)."""
    event = StepEvent(
        step=step, epoch=epoch, target=target, log_ps=log_ps, lrs=lrs, parts=parts,
        times=times, bus=bus.copy(), encoded=encoded,
    )  # fmt: skip
    if with_batch_stats:
        event.stats = cohort_batch_stats(event.log_ps, target, list(lrs))
    return event


def losses_as_floats(steps: Sequence[Mapping[int, LossParts]]) -> list[dict[int, Losses]]:
    """Every student's (total, ce, distill) as floats, for each of `steps` (several steps'
    losses kept on the device until a reporting step): on an accelerator one transfer, one sync
    for all; on the CPU, where nothing waits, scalar by scalar."""
    tensors = [t for parts in steps for p in parts.values() for t in (p.total, p.ce, p.distill)]
    if not tensors:
        return [{} for _ in steps]
    device = tensors[0].device
    if all(t.device.type == "cpu" for t in tensors):  # nothing to wait for: a stack costs more
        flat = [t.item() for t in tensors]
    else:
        if any(t.device != device for t in tensors):  # the peers' GPUs differ: on the first's
            tensors = all_on(tensors, device)
        with torch.no_grad():
            flat = torch.stack(tensors).tolist()
    out, n = [], 0
    for parts in steps:
        out.append({i: Losses(*flat[n + 3 * k : n + 3 * k + 3]) for k, i in enumerate(parts)})
        n += 3 * len(parts)
    return out
