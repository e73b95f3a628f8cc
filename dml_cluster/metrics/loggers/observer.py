"""What the experiment loggers are told, and when: the observer that turns training events into
scalars and hands them to each logger (a `Sink`).

On every `run.log_every`-th step (a reporting step; any other step costs one modulo), for each
hosted student: `train/loss`, `train/ce`, `train/distill`, `train/lr`, `train/samples_per_s`
(this process's, since the previous reporting step), and the batch's `train/accuracy` and
`train/entropy`. On every evaluation, for each hosted peer: `eval/accuracy`, `eval/nll`,
`eval/ece`, `eval/entropy` (and a language model's `eval/perplexity`), `eval/kl_from_others`
(the mean KL(p_other || p_peer)), `eval/agreement`, and the cohort's `ensemble/accuracy`,
`ensemble/nll`, `ensemble/ece` (`ensemble/perplexity`). The step
is the training step. The config (flattened) and its hash are each run's hyper-parameters.
"""

from __future__ import annotations

import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from dml_cluster.console import say
from dml_cluster.errors import first_line
from dml_cluster.metrics.events import EvalEvent, StepEvent
from dml_cluster.metrics.loggers.context import LoggerContext, Sink

if TYPE_CHECKING:
    from dml_cluster.config import Config


class ExperimentLogger:
    """The observer behind `metrics.loggers`."""

    def __init__(self, cfg: Config, context: LoggerContext, sinks: list[Sink]) -> None:
        self.every = cfg.run.log_every
        self.context, self.sinks = context, sinks
        self._last: tuple[int, float] | None = None  # (step, time) of the previous report
        self._closed = False

    def wants_batch_stats(self, step: int) -> bool:
        return step % self.every == 0

    def on_step(self, event: StepEvent) -> None:
        if event.step % self.every:
            return
        now = time.perf_counter()
        if self._last is None or event.step <= self._last[0]:
            rate = event.batch_size / event.step_seconds if event.step_seconds > 0 else 0.0
        else:
            steps, seconds = event.step - self._last[0], now - self._last[1]
            rate = steps * event.batch_size / seconds if seconds > 0 else 0.0
        self._last = (event.step, now)
        for i, peer in event.peers.items():
            if peer.losses is None or i not in self.context.peers:
                continue  # a teacher does not learn
            scalars = {
                "train/loss": peer.losses.total,
                "train/ce": peer.losses.ce,
                "train/distill": peer.losses.distill,
                "train/lr": peer.lr,
                "train/samples_per_s": rate,
            }
            if peer.batch is not None:
                scalars["train/accuracy"] = peer.batch.accuracy
                scalars["train/entropy"] = peer.batch.entropy
            self._log(i, scalars, event.step)

    def on_eval(self, event: EvalEvent) -> None:
        report = event.report
        ensemble = report.get("ensemble", {})
        for i, name in self.context.peers.items():
            mine = report["peers"].get(name)
            if mine is None:
                continue
            keys = ("accuracy", "nll", "ece", "entropy", "perplexity")
            scalars = {f"eval/{k}": float(mine[k]) for k in keys if k in mine}
            pairs = [v for k, v in report.get("pairs", {}).items() if k.startswith(f"{name}|")]
            if pairs:
                scalars["eval/kl_from_others"] = sum(p["kl"] for p in pairs) / len(pairs)
                scalars["eval/agreement"] = sum(p["agreement"] for p in pairs) / len(pairs)
            for key in ("accuracy", "nll", "ece", "perplexity"):
                if key in ensemble and len(report["peers"]) > 1:
                    scalars[f"ensemble/{key}"] = float(ensemble[key])
            self._log(i, scalars, event.step)

    def on_end(self, summary: dict[str, Any]) -> None:
        self.close(finished=True)

    def close(self, finished: bool = False) -> None:
        """Close every logger's runs once (on_end, or the observers' block ending early)."""
        if self._closed:
            return
        self._closed = True
        for sink in self.sinks:
            with suppress(Exception):  # one logger failing to close must not hide the others
                sink.close(finished)

    def _log(self, peer: int, scalars: dict[str, float], step: int) -> None:
        for sink in list(self.sinks):
            try:
                sink.log(peer, scalars, step)
            except Exception as err:  # noqa: BLE001 - a logger (a server) failing must not stop training
                say(
                    f"dml-cluster: warning: metrics.loggers: {type(sink).__name__} failed at "
                    f"step {step} ({first_line(err)}); it is off for the rest of this run"
                )
                self.sinks.remove(sink)
                with suppress(Exception):
                    sink.close(finished=False)
