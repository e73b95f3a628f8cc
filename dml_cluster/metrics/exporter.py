"""The Prometheus endpoint of a peer process: a trainer `Observer` serving /metrics over HTTP.

One endpoint per process. Under torchrun a process hosts one peer; the one-process engine hosts
the whole cohort and labels every series by peer. Labels are kept to `peer`, `other_peer` and
`split` (train / test), so a cohort of K peers has K * (K - 1) divergence series per split.

A scrape is a consistent snapshot: the trainer updates every value of a step under one lock and
the endpoint renders under the same lock, so `dml_step` and the divergence read in one scrape
belong to the same batch. The gauges and counters are brought up to plain values kept here when a
scrape renders (under the same lock), so a value that changes every step costs one assignment,
not one metric update, between scrapes.

Everything comes from the trainer's events (`metrics.events`), never from the trainer itself.
On a step that reports nothing the exporter keeps the step, epoch, time, learning rates, sample
count and bus counters, and puts the step's losses and times (device values: reading them would
make the host wait for the accelerator) aside. Every `metrics.stats_every`-th step (and at an
evaluation and at the end) it reads the steps put aside in one go: every step's losses go into
their moving averages and every step's times into the duration histograms, in step order, so
they still follow every step, up to `stats_every` steps late. The batch statistics (accuracy,
entropy, divergence, agreement: the costly part) are read on those steps only, so their moving
averages average the sampled batches.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram, Info
from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from dml_cluster.bus.base import BusStats
from dml_cluster.config import Config
from dml_cluster.devices import hosted_devices
from dml_cluster.errors import ConfigError
from dml_cluster.metrics.events import losses_as_floats
from dml_cluster.run_folder import missing_folders, remove_if_empty, write_atomic

if TYPE_CHECKING:
    from dml_cluster.methods import LossParts
    from dml_cluster.metrics.events import EvalEvent, StepEvent
    from dml_cluster.timing import StepTimes

# from a 0.5 ms MLP step to a 30 s large-model step
TIME_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

PEER, PAIR = ("peer",), ("peer", "other_peer", "split")

RENAMED_METRICS = {"dml_mimicry_loss": "dml_distill_loss"}
"""Metrics earlier versions served under another name: the old name -> the one served now. A
dashboard asks for both (`new or old`), so series stored before the rename still chart."""


class _Snapshot:
    """A collector rendering a group of metrics under the lock their writer holds, after bringing
    them up to date (`publish`)."""

    def __init__(
        self, lock: threading.Lock, metrics: list[Any], publish: Callable[[], None]
    ) -> None:
        self._lock, self._metrics, self._publish = lock, metrics, publish

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            self._publish()
            return [family for m in self._metrics for family in m.collect()]


@dataclass
class _Latest:
    """What the last step left (every hosted peer takes every step), kept as plain values until
    a scrape publishes them."""

    step: int = -1  # -1: no step yet (nothing to publish)
    epoch: int = 0
    finished_at: float = 0.0
    lrs: Any = None  # by hosted peer
    samples: int = 0
    samples_published: int = 0


class PrometheusExporter:
    """Serves the cohort's health for the peers this process hosts; see the module docstring."""

    def __init__(
        self, cfg: Config, hosted: tuple[int, ...], run_id: str, local_rank: int, replica: int = 0
    ) -> None:
        """`replica`: a data-parallel peer's replica (D > 1: in the dml_run and dml_peer info
        as `replica`, so every series of the process joins to it)."""
        self.cfg, self.hosted = cfg, hosted
        self.names = [p.name for p in cfg.peers]
        self.smoothing = cfg.metrics.smoothing
        self.stats_every = cfg.metrics.stats_every
        self._lock = threading.Lock()
        self._ema: dict[tuple[Any, tuple[str, ...]], float] = {}  # by (metric, labels)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._latest = _Latest()
        # the losses and times of the steps since the last read (device values: see the docstring)
        self._aside: list[tuple[dict[int, LossParts], StepTimes]] = []
        self._bus = BusStats()  # the bus counters at the last event
        self._bus_seen = BusStats()  # ... and at the last scrape
        self._announced: list[Path] = []  # the endpoint files written
        self._made: list[Path] = []  # ... and the folders made for them
        self._observed = False  # whether the trainer has told it anything
        self._define()
        replicated = {}
        if cfg.cohort.replicas > 1:
            replicated = {"replica": str(replica), "replicas": str(cfg.cohort.replicas)}
        self._run.info(
            {
                "run_id": run_id,
                "run_name": cfg.run.name,
                "config_hash": cfg.hash(),
                "transport": cfg.bus.transport,
                "cohort_size": str(len(cfg.peers)),
                "method": cfg.method.name,
                "update": cfg.cohort.update,
                **replicated,
            }
        )
        devices = hosted_devices(cfg, hosted, local_rank)
        for i in hosted:
            peer = cfg.peers[i]
            info = {"model": peer.model, "index": str(i), "device": str(devices[i])}
            self._peer.labels(self.names[i]).info({**info, **replicated})
        self.registry = CollectorRegistry()
        self.registry.register(_Snapshot(self._lock, self._all, self._publish))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._server, self._thread = self._serve(cfg.metrics.address, cfg.metrics.port, local_rank)
        self.port = self._server.server_port
        self.url = f"http://{_url_host(cfg.metrics.address)}:{self.port}/metrics"
        self._announce()

    # -- the metrics ------------------------------------------------------------------------

    def _define(self) -> None:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = PEER) -> Gauge:
            return Gauge(name, doc, labels, registry=None)

        self._run = Info("dml_run", "The run this process belongs to.", registry=None)
        self._peer = Info("dml_peer", "A peer hosted by this process.", PEER, registry=None)
        self._step = gauge("dml_step", "Index of the last completed training step.")
        self._epoch = gauge("dml_epoch", "Epoch of the last completed step (0-based).")
        self._last = gauge(
            "dml_last_step_timestamp_seconds", "Unix time at which the last step completed."
        )
        self._lr = gauge("dml_learning_rate", "Current learning rate of the peer's optimizer.")
        self._kl = gauge(
            "dml_kl_divergence",
            "KL(p_other || p_peer) in nats, mean over samples: what the peer's mimicry pulls "
            "down. split=train: moving average over sampled training batches; test: last "
            "evaluation.",
            PAIR,
        )
        self._js = gauge(
            "dml_js_divergence", "Jensen-Shannon divergence of the two peers, nats.", PAIR
        )
        self._agree = gauge(
            "dml_agreement_ratio", "Fraction of samples where both peers predict one class.", PAIR
        )
        self._ce = gauge(
            "dml_cross_entropy_loss", "Cross-entropy on training batches (moving average)."
        )
        self._distill = gauge(
            "dml_distill_loss",
            "The loss term that learns from other networks (DML mimicry, KD, DKD, hint, AT) on "
            "training batches (moving average); before, dml_mimicry_loss.",
        )
        self._loss = gauge("dml_loss", "Total loss on training batches (moving average).")
        self._acc = gauge(
            "dml_accuracy_ratio",
            "Top-1 accuracy. split=train: moving average over sampled batches; test: last "
            "evaluation.",
            ("peer", "split"),
        )
        self._entropy = gauge(
            "dml_posterior_entropy_nats", "Mean posterior entropy of the peer.", ("peer", "split")
        )
        self._nll = gauge(
            "dml_validation_loss_nats",
            "Mean negative log-likelihood of the true class (a language model's: nats per "
            "token) at the last evaluation.",
        )
        self._perplexity = gauge(
            "dml_perplexity",
            "A language model's validation perplexity, exp(nats per token), at the last "
            "evaluation (language-model cohorts only).",
        )
        self._ens_acc = Gauge(
            "dml_ensemble_accuracy_ratio",
            "Top-1 accuracy of the cohort ensemble (mean of probabilities).",
            ("split",),
            registry=None,
        )
        self._ens_entropy = Gauge(
            "dml_ensemble_posterior_entropy_nats",
            "Mean posterior entropy of the cohort ensemble.",
            ("split",),
            registry=None,
        )

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, PEER, registry=None)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, PEER, buckets=TIME_BUCKETS, registry=None)

        self._samples = counter(
            "dml_train_samples", "Training samples (a language model's: tokens) processed."
        )
        self._sent = counter("dml_bus_sent_bytes", "Bytes this process sent on the bus.")
        self._received = counter("dml_bus_received_bytes", "Bytes this process received.")
        self._rejected = counter(
            "dml_bus_rejected_messages", "Bus messages dropped as malformed, foreign or stale."
        )
        self._sent_each = gauge(
            "dml_bus_sent_bytes_per_exchange",
            "Bytes this process sent per exchange on the bus (mean since the last scrape).",
        )
        self._received_each = gauge(
            "dml_bus_received_bytes_per_exchange",
            "Bytes this process received per exchange on the bus (mean since the last scrape).",
        )
        self._kept_mass = gauge(
            "dml_encoding_kept_mass_ratio",
            "Sparse bus.encoding: the probability mass of the peer's kept (topk) or distinct "
            "drawn (sampled) classes, mean over rows (moving average over sampled steps).",
        )
        self._distinct = gauge(
            "dml_encoding_distinct_ids",
            "bus.encoding sampled: distinct class ids per row among bus.samples draws (moving "
            "average over sampled steps).",
        )
        self._wait = counter(
            "dml_bus_wait_seconds",
            "Time spent waiting for the other peers' predictions (the slowest peer).",
        )
        self._step_time = histogram(
            "dml_step_duration_seconds",
            "Time of a training step (forward, exchange, backward, update): wall time on the CPU, "
            "device time on a GPU.",
        )
        self._exchange_time = histogram(
            "dml_exchange_duration_seconds",
            "Time of a step's exchanges on the bus, waiting included (likewise).",
        )
        self._all = [
            self._run, self._peer, self._step, self._epoch, self._last, self._lr, self._kl,
            self._js, self._agree, self._ce, self._distill, self._loss, self._acc, self._entropy,
            self._nll, self._perplexity, self._ens_acc, self._ens_entropy, self._samples,
            self._sent, self._received, self._rejected, self._wait, self._step_time,
            self._exchange_time, self._sent_each, self._received_each, self._kept_mass,
            self._distinct,
        ]  # fmt: skip

    # -- serving ----------------------------------------------------------------------------

    def _serve(self, address: str, base: int, local_rank: int) -> tuple[Any, threading.Thread]:
        port = base + local_rank if base else 0
        try:
            return start_http_server(port, address, registry=self.registry)
        except OSError as err:
            chosen = "port" in self.cfg.metrics.model_fields_set  # asked for, not the default
            if err.errno != errno.EADDRINUSE or port == 0 or chosen:
                raise ConfigError(
                    f"config error: metrics: cannot serve on {address}:{port}: {err.strerror}"
                ) from None
        print(
            f"dml-cluster: metrics port {port} is in use; serving on a free port instead "
            f"(see {self._endpoint_dir()})",
            file=sys.stderr,
            flush=True,
        )
        return start_http_server(0, address, registry=self.registry)

    def _endpoint_dir(self) -> Path:
        return self.cfg.run.dir / "metrics"

    def _announce(self) -> None:
        """Write where each hosted peer is served, for scrape configs, tests and people."""
        folder = self._endpoint_dir()
        self._made = missing_folders(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i in self.hosted:
            record = {
                "peer": self.names[i],
                "url": self.url,
                "address": self.cfg.metrics.address,
                "port": self.port,
                "pid": os.getpid(),
            }
            path = folder / f"{self.names[i]}.json"
            write_atomic(path, (json.dumps(record) + "\n").encode())
            self._announced.append(path)
        hosted = ", ".join(self.names[i] for i in self.hosted)
        print(f"metrics: {self.url} ({hosted})", flush=True)

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice. An endpoint that served no
        step (a start that stopped: another peer's endpoint could not bind, a refused resume)
        takes its endpoint files back, so the run folder is left as it was found (first: a
        stop signal may end the server's shutdown, which waits for its loop)."""
        if not self._observed:
            for path in self._announced:
                path.unlink(missing_ok=True)
            remove_if_empty(self._made)
        self._announced = []
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- updates ----------------------------------------------------------------------------

    def _smooth(self, metric: Any, labels: tuple[str, ...], value: float) -> None:
        """Fold a training-batch value into its moving average (published at the next scrape)."""
        key = (metric, labels)
        old = self._ema.get(key)
        self._ema[key] = (
            value if old is None else self.smoothing * old + (1.0 - self.smoothing) * value
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """The labelled series, looked up once."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _publish(self) -> None:
        """Bring the gauges and counters up to the values kept since the last scrape (called by
        the collector, under the lock)."""
        child, latest = self._child, self._latest
        if latest.step >= 0:
            for i in self.hosted:
                name = self.names[i]
                child(self._step, name).set(latest.step)
                child(self._epoch, name).set(latest.epoch)
                child(self._last, name).set(latest.finished_at)
                child(self._lr, name).set(latest.lrs[i])
                child(self._samples, name).inc(latest.samples - latest.samples_published)
            latest.samples_published = latest.samples
        for (metric, labels), value in self._ema.items():
            child(metric, *labels).set(value)
        now, seen = self._bus, self._bus_seen
        deltas = (
            (self._sent, now.bytes_sent - seen.bytes_sent),
            (self._received, now.bytes_received - seen.bytes_received),
            (self._rejected, now.messages_rejected - seen.messages_rejected),
            (self._wait, now.wait_seconds - seen.wait_seconds),
        )
        for counter, delta in deltas:  # per process, shown under each hosted peer
            for i in self.hosted:
                child(counter, self.names[i]).inc(max(delta, 0))
        per_exchange = now.per_exchange(seen)
        if per_exchange is not None:  # else the last value stands
            for i in self.hosted:
                child(self._sent_each, self.names[i]).set(per_exchange[0])
                child(self._received_each, self.names[i]).set(per_exchange[1])
        self._bus_seen = now

    def wants_batch_stats(self, step: int) -> bool:
        return step % self.stats_every == 0

    def on_step(self, event: StepEvent) -> None:
        self._observed = True
        now = time.time()
        with self._lock:
            latest = self._latest
            latest.step, latest.epoch, latest.finished_at = event.step, event.epoch, now
            latest.lrs = event.lrs
            latest.samples += event.batch_size
            self._bus = event.bus
            self._aside.append((event.parts, event.times))
            if event.step % self.stats_every == 0:
                self._read_aside()
                self._sample(event)

    def _read_aside(self) -> None:
        """Fold the losses and times put aside into the moving averages and histograms, in step
        order (one transfer for all the losses; on a device, the wait of a reporting step)."""
        aside, self._aside = self._aside, []
        if not aside:
            return
        child, names, smooth = self._child, self.names, self._smooth
        steps = [times.step_seconds for _, times in aside]
        exchanges = [times.exchange_seconds for _, times in aside]
        for i in self.hosted:
            step_time, exchange_time = (
                child(self._step_time, names[i]),
                child(self._exchange_time, names[i]),
            )
            for step_seconds, exchange_seconds in zip(steps, exchanges, strict=True):
                step_time.observe(step_seconds)
                exchange_time.observe(exchange_seconds)
        for step_losses in losses_as_floats([parts for parts, _ in aside]):
            for i, loss in step_losses.items():
                name = (names[i],)
                smooth(self._ce, name, loss.ce)
                smooth(self._distill, name, loss.distill)
                smooth(self._loss, name, loss.total)

    def _sample(self, event: StepEvent) -> None:
        """The batch statistics of a sampled step into their moving averages."""
        names, smooth = self.names, self._smooth
        for i, kept in event.encoding.items():
            if i not in self.hosted:
                continue
            smooth(self._kept_mass, (names[i],), kept["kept_mass"])
            if "distinct_ids" in kept:
                smooth(self._distinct, (names[i],), kept["distinct_ids"])
        for i, batch in (event.stats or {}).items():
            name = names[i]
            if batch.accuracy is not None:
                smooth(self._acc, (name, "train"), batch.accuracy)
            smooth(self._entropy, (name, "train"), batch.entropy)
            for j, pair in batch.pairs.items():
                labels = (name, names[j], "train")
                smooth(self._kl, labels, pair.kl)
                smooth(self._js, labels, pair.js)
                smooth(self._agree, labels, pair.agreement)

    def on_eval(self, event: EvalEvent) -> None:
        self._observed = True
        report = event.report
        with self._lock:
            self._read_aside()
            for i in self.hosted:
                name = self.names[i]
                peer = report["peers"][name]
                self._acc.labels(name, "test").set(peer["accuracy"])
                self._entropy.labels(name, "test").set(peer["entropy"])
                self._nll.labels(name).set(peer["nll"])
                if "perplexity" in peer:
                    self._perplexity.labels(name).set(peer["perplexity"])
                for j, other in enumerate(self.names):
                    pair = report["pairs"].get(f"{name}|{other}")
                    if j == i or pair is None:
                        continue
                    self._kl.labels(name, other, "test").set(pair["kl"])
                    self._js.labels(name, other, "test").set(pair["js"])
                    self._agree.labels(name, other, "test").set(pair["agreement"])
            self._ens_acc.labels("test").set(report["ensemble"]["accuracy"])
            self._ens_entropy.labels("test").set(report["ensemble"]["entropy"])
            self._bus = event.bus

    def on_end(self, summary: dict[str, Any]) -> None:
        self._observed = True
        with self._lock:
            self._read_aside()
        if self.cfg.metrics.linger_s > 0:
            time.sleep(self.cfg.metrics.linger_s)


def _url_host(address: str) -> str:
    """A host part that reaches an endpoint bound to `address` (the wildcard means here)."""
    if address in ("", "0.0.0.0"):
        return "127.0.0.1"
    if address == "::":
        return "[::1]"
    return f"[{address}]" if ":" in address else address
