"""The in-process bus of the one-process engine: every peer is local, nothing moves; what each
peer reads is encoded and decoded as a transport between processes would (bus/encoding.py), in
the exchange's encoding (the bus's own unless told another)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from dml_cluster.bus.base import Bus, BusStats, StepKey
from dml_cluster.bus.encoding import Encoding
from dml_cluster.devices import on_one_device


class LocalBus(Bus):
    def __init__(self, encoding: Encoding | str = "float32") -> None:
        """`encoding`: bus.encoding, applied to every exchanged prediction as between
        processes, so the one-process engine trains what a cohort of processes trains."""
        self.encoding = Encoding.of(encoding)
        self.stats = BusStats()

    def exchange(
        self,
        key: StepKey,
        local: Mapping[int, Tensor],
        senders: Sequence[int],
        receivers: Sequence[int] | None = None,
        encoding: Encoding | None = None,
    ) -> dict[int, Tensor]:
        self.stats.exchanges += 1
        missing = [s for s in senders if s not in local]
        if missing:
            raise ValueError(f"LocalBus hosts every peer, but peers {missing} were not given")
        # every receiver gets the others' on one device: the first sender's (the trainer hands
        # in predictions already on its exchange device; peers on other GPUs move here)
        applied = self.encoding if encoding is None else encoding
        sent = {s: applied.as_received(local[s], key, s) for s in senders}
        return on_one_device(sent, local[senders[0]].device)
