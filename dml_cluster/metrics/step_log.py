"""The per-step JSONL run log as an observer: a `train` record per hosted student every
`run.log_every` steps, in runs/<name>/peers/<peer>.jsonl (read back by `report`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dml_cluster.metrics.events import EvalEvent, StepEvent
from dml_cluster.runlog import JsonlLog


class StepLog:
    """Writes the `train` records of the peers whose logs it is given (teachers log nothing)."""

    def __init__(self, logs: Mapping[int, JsonlLog], names: Sequence[str], every: int) -> None:
        self.logs, self.names, self.every = logs, list(names), every

    def wants_batch_stats(self, step: int) -> bool:
        return step % self.every == 0

    def on_step(self, event: StepEvent) -> None:
        if event.step % self.every:
            return
        for i, peer in event.peers.items():
            if peer.losses is None:
                continue  # a teacher
            assert peer.batch is not None, "statistics are computed on the steps asked for"
            self.logs[i].write(
                "train",
                step=event.step,
                epoch=event.epoch,
                peer=self.names[i],
                loss=peer.losses.total,
                ce=peer.losses.ce,
                mimicry=peer.losses.mimicry,
                lr=peer.lr,
                step_seconds=event.step_seconds,
                exchange_seconds=event.exchange_seconds,
                bytes_sent=event.bus.bytes_sent,
                wait_seconds=event.bus.wait_seconds,
                step_wait_seconds=event.wait_seconds,
                train_accuracy=peer.batch.accuracy,
                entropy=peer.batch.entropy,
                pairs=peer.batch.pairs_by_name(self.names),  # KL(p_other || p_peer), JS, agreement
            )

    def on_eval(self, event: EvalEvent) -> None:
        pass  # evaluations go to the cohort log, which the reporting process writes

    def on_end(self, summary: dict[str, Any]) -> None:
        pass  # the trainer closes the logs (it also writes resume records in them)
