"""The in-process bus of the one-process engine: every peer is local, nothing moves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from dml_cluster.bus.base import Bus, BusStats, StepKey
from dml_cluster.devices import on_one_device


class LocalBus(Bus):
    def __init__(self) -> None:
        self.stats = BusStats()

    def exchange(
        self,
        key: StepKey,
        local: Mapping[int, Tensor],
        senders: Sequence[int],
        receivers: Sequence[int] | None = None,
    ) -> dict[int, Tensor]:
        missing = [s for s in senders if s not in local]
        if missing:
            raise ValueError(f"LocalBus hosts every peer, but peers {missing} were not given")
        # every receiver gets the others' on one device: the first sender's (the trainer hands
        # in predictions already on its exchange device; peers on other GPUs move here)
        return on_one_device({s: local[s] for s in senders}, local[senders[0]].device)
