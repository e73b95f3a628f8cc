"""The one interface the trainer talks to."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:  # bus/encoding.py imports this module
    from dml_cluster.bus.encoding import Encoding

EVAL_ROUND = 0xFFFF
"""The round number of an evaluation exchange (test-set predictions)."""


@dataclass(frozen=True)
class StepKey:
    """What an exchange is about: a step, a round within it, and the batch it was computed on."""

    step: int
    round: int
    fingerprint: int


@dataclass
class BusStats:
    """Counters a bus keeps; read by metrics and benchmarks."""

    bytes_sent: int = 0
    bytes_received: int = 0
    exchanges: int = 0
    """Exchanges this process took part in (bytes per exchange: bytes over exchanges)."""
    messages_rejected: int = 0
    wait_seconds: float = 0.0
    max_pending_steps: int = 0
    """The most steps of one peer's messages this process has held at once (zmq: <= window)."""
    max_lead_steps: int = 0
    """The furthest this process has published ahead of a receiver's last consumed step (zmq:
    <= window)."""

    def per_exchange(self, since: BusStats) -> tuple[float, float] | None:
        """(bytes sent, bytes received) per exchange since the counters were `since`; None
        when no exchange took place in between."""
        n = self.exchanges - since.exchanges
        if n <= 0:
            return None
        return (
            (self.bytes_sent - since.bytes_sent) / n,
            (self.bytes_received - since.bytes_received) / n,
        )

    def copy(self) -> BusStats:
        """The counters as they are now (a copy taken after every step: a cheap one)."""
        snapshot = object.__new__(BusStats)
        snapshot.__dict__.update(self.__dict__)
        return snapshot


class Bus(ABC):
    """Exchanges per-sample log-probabilities [B, C] among the peers of a cohort.

    `exchange(key, local, senders, receivers)` publishes the tensors of the peers this process
    hosts (`local`, keyed by peer index; only those in `senders` are sent) to the peers in
    `receivers` (default: everyone) and, if this process hosts a receiver, returns the tensors of
    every peer in `senders`, own ones included, all for the same `key`. A process hosting no
    receiver does not wait for predictions: it gets back only its own tensors (teachers publish,
    never listen). A transport that buffers (zmq) bounds how far a sender may run ahead of its
    receivers (`bus.window` steps); one built on collectives involves every process anyway
    (torch's all_gather does).

    What comes back is what a receiver reads under the exchange's encoding (bus/encoding.py),
    own predictions included: float32 [B, C] tensors for a dense encoding, `TopK` / `Sampled`
    rows (int64 indices and counts, float32 values) for topk / sampled. The exchange's encoding
    is `encoding` when given, else the bus's own (`bus.encoding`); every process of an exchange
    must be told the same one. A receiver takes a message only in the encoding it expects for
    that exchange (its kind and sizes): any other is malformed, dropped and counted (zmq) or an
    error (torch, whose collectives cannot skip a message).
    """

    stats: BusStats
    patience_s: float | None = None
    """While set: how long the next exchanges may wait for a peer, in place of the steady-state
    `bus.timeout_s` (the trainer sets `bus.startup_timeout_s` for the first steps of a run and
    around evaluations, when a peer may be compiling or evaluating; a checkpoint's agreement
    waits on the control channel, whose timeout is `bus.startup_timeout_s` too)."""

    def set_patience(self, seconds: float | None) -> None:
        """Wait up to `seconds` for peers from now on; None: the steady-state timeout again."""
        self.patience_s = seconds

    @abstractmethod
    def exchange(
        self,
        key: StepKey,
        local: Mapping[int, Tensor],
        senders: Sequence[int],
        receivers: Sequence[int] | None = None,
        encoding: Encoding | None = None,
    ) -> dict[int, Tensor]: ...

    def close(self) -> None:  # noqa: B027 - optional for transports holding nothing
        """Release sockets; safe to call twice."""

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
