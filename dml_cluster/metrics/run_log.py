"""The JSONL run log as an observer: a `train` record per hosted student every `run.log_every`
steps in runs/<name>/peers/<peer>.jsonl, and in the reporting process an `eval` record per
evaluation in runs/<name>/cohort.jsonl with a progress line on stdout (read back by `report`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dml_cluster.bus.base import BusStats
from dml_cluster.metrics.events import EvalEvent, StepEvent
from dml_cluster.run_folder import JsonlLog


class RunLog:
    """Writes into the logs it is given; the trainer opens them (it also writes resume records
    there) and closes them."""

    def __init__(
        self,
        peer_logs: Mapping[int, JsonlLog],
        cohort_log: JsonlLog | None,
        names: Sequence[str],
        every: int,
        epochs: int,
        devices: Mapping[int, str] | None = None,
    ) -> None:
        """`peer_logs`: by hosted peer; `cohort_log`: None outside the reporting process;
        `devices`: where each hosted peer runs (in its train records)."""
        self.peer_logs, self.cohort_log = peer_logs, cohort_log
        self.names, self.every, self.epochs = list(names), every, epochs
        self.devices = dict(devices or {})
        self._bus_seen = BusStats()  # the bus counters at the last train record

    def wants_batch_stats(self, step: int) -> bool:
        return step % self.every == 0

    def on_step(self, event: StepEvent) -> None:
        if event.step % self.every:
            return  # nothing read from the event (its losses and times are device values)
        times = event.times
        per_exchange = event.bus.per_exchange(self._bus_seen)  # since the last record
        self._bus_seen = event.bus
        sent_each, received_each = per_exchange or (0.0, 0.0)
        encoding = event.encoding
        for i, peer in event.peers.items():
            if peer.losses is None or i not in self.peer_logs:
                continue  # a teacher; a data-parallel peer's replica other than 0
            assert peer.batch is not None, "statistics are computed on the steps asked for"
            self.peer_logs[i].write(
                "train",
                step=event.step,
                epoch=event.epoch,
                peer=self.names[i],
                device=self.devices.get(i, "cpu"),
                loss=peer.losses.total,
                ce=peer.losses.ce,
                distill=peer.losses.distill,
                lr=peer.lr,
                step_seconds=times.step_seconds,  # device time on an accelerator
                forward_seconds=times.forward_seconds,
                exchange_seconds=times.exchange_seconds,
                update_seconds=times.update_seconds,  # losses, backward, optimizer step
                bytes_sent=event.bus.bytes_sent,
                bytes_received=event.bus.bytes_received,
                # means over the exchanges since the previous record (this process's)
                bytes_sent_per_exchange=sent_each,
                bytes_received_per_exchange=received_each,
                **encoding.get(i, {}),  # sparse: kept_mass (and sampled: distinct_ids)
                wait_seconds=event.bus.wait_seconds,
                step_wait_seconds=event.wait_seconds,
                train_accuracy=peer.batch.accuracy,
                entropy=peer.batch.entropy,
                pairs=peer.batch.pairs_by_name(self.names),  # KL(p_other || p_peer), JS, agreement
            )

    def on_eval(self, event: EvalEvent) -> None:
        if self.cohort_log is None:
            return
        report, elapsed = event.report, event.elapsed_seconds
        self.cohort_log.write(
            "eval", epoch=event.epoch, step=event.step, elapsed_seconds=elapsed, **report
        )
        accs = "  ".join(f"{n} {_figure(r)}" for n, r in report["peers"].items())
        ens = f"  ensemble {_figure(report['ensemble'])}" if len(self.names) > 1 else ""
        print(
            f"epoch {event.epoch}/{self.epochs}  step {event.step}  {accs}{ens}  ({elapsed:.1f} s)",
            flush=True,
        )

    def on_end(self, summary: dict[str, Any]) -> None:
        pass  # the trainer closes the logs and writes summary.json


def _figure(result: dict[str, Any]) -> str:
    """A peer's headline figure: accuracy, or a language model's validation perplexity."""
    if "perplexity" in result:
        return f"ppl {result['perplexity']:.2f}"
    return f"{100 * result['accuracy']:.2f}%"
