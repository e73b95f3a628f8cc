"""The cohort training loop, written once for every layout.

A process hosts some peers of the cohort (all K in the one-process engine, one per process under
torchrun) and talks to the others through a `Bus`. Per step: the shared batch -> forward ->
exchange log-probabilities -> each hosted peer's loss -> step. The loop never asks which
transport it runs on; the one-process engine is this loop with a `LocalBus`.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dml_cluster.bus import EVAL_ROUND, Bus, StepKey
from dml_cluster.bus.encoding import FLOAT32
from dml_cluster.checkpoint import CohortCheckpoints, Position, Restored
from dml_cluster.cohort import Peer, build_peer, refresh_predictions
from dml_cluster.config import Config
from dml_cluster.control import Control, LocalControl
from dml_cluster.data.prepare import RunData, data_path, prepare_data
from dml_cluster.data.sampler import steps_per_epoch
from dml_cluster.data.stats import DATA_FILE
from dml_cluster.devices import all_on
from dml_cluster.errors import CheckpointError, ConfigError
from dml_cluster.evaluation import evaluate_cohort, per_class_table, predict
from dml_cluster.init_from import source_record, source_summary, starting_line
from dml_cluster.losses import UNLABELLED
from dml_cluster.method_inputs import Given, MethodInputs
from dml_cluster.methods import LossParts, Predictions, Progress, StepView, build_method
from dml_cluster.metrics.chance import ChanceWatch
from dml_cluster.metrics.events import EvalEvent, Observer, StepEvent, build_step_event
from dml_cluster.metrics.progress import CLOCK_FILE, ProgressDisplay, RunClock, RunPlan
from dml_cluster.metrics.run_log import RunLog
from dml_cluster.models import as_rows
from dml_cluster.models.hf_source import write_pretrained
from dml_cluster.optimizer import clip_gradients, set_learning_rate, step_schedule
from dml_cluster.precision import autocast, to_layout
from dml_cluster.preemption import CohortStop, Preempted
from dml_cluster.replicas import Replicas, gather_streams, replicate, sharding
from dml_cluster.run_folder import JsonlLog, record_config, write_json_atomic
from dml_cluster.sharding import whole
from dml_cluster.sparse_rows import Sampled, TopK, describe
from dml_cluster.timing import EXCHANGE, FORWARD, UPDATE, StepTimes, step_timer
from dml_cluster.token_evaluation import TokenEvaluation, token_table


@dataclass(frozen=True)
class StepResult:
    """What one step produced: hosted students' losses (teachers have none), and the predictions
    on the batch that this process received (every peer's, except in a teacher's process under
    zmq: teachers receive nothing during training)."""

    parts: dict[int, LossParts]
    log_ps: dict[int, Tensor | TopK | Sampled]  # as the bus delivered them (sparse: not dense)
    times: StepTimes  # the step's and its phases' (read on reporting steps: a device's wait)
    encoded: dict[int, dict[str, Tensor]] = dataclasses.field(default_factory=dict)
    """Sparse encodings: by peer, what its rows kept (sparse_rows.describe: device scalars)."""


@dataclass(frozen=True)
class Placement:
    """Which peers this process hosts, on which device, and whether it reports for the cohort.

    `device` holds the data and what the bus exchanges; `devices` gives a hosted peer another
    one (the one-process engine spreading peers over GPUs; dml_cluster.devices); `replicas`:
    which of its peer's data-parallel replicas this process is (dml_cluster.replicas)."""

    hosted: tuple[int, ...]
    device: torch.device
    reporter: bool
    devices: Mapping[int, torch.device] = dataclasses.field(default_factory=dict)
    replicas: Replicas = Replicas()

    def device_of(self, peer: int) -> torch.device:
        return self.devices.get(peer, self.device)


class CohortTrainer:
    def __init__(
        self,
        cfg: Config,
        bus: Bus,
        placement: Placement,
        observers: Sequence[Observer] = (),
        control: Control | None = None,
        stop: CohortStop | None = None,
        data: RunData | None = None,
    ) -> None:
        """`control`: the channel the cohort's processes agree on checkpoints through (default:
        `LocalControl`, for a process hosting the whole cohort); `stop`: where the cohort stops
        and saves after a SIGTERM (default: this process alone decides); `data`: the run's data,
        prepared before anything is written to the run folder (default: prepared here)."""
        self.cfg, self.bus, self.placement = cfg, bus, placement
        self.control = control if control is not None else LocalControl()
        self.stop = stop if stop is not None else CohortStop(cfg)
        self.observers = list(observers)
        self._wait_seconds = 0.0
        self.size = len(cfg.peers)
        self.names = [p.name for p in cfg.peers]
        device = placement.device
        self.prepared = prepared = data if data is not None else prepare_data(cfg)
        self.data = data = prepared.dataset
        self.tokens = prepared.is_text  # language models: one prediction row per position
        self.batches = data_path(cfg, prepared, device, placement.replicas.shard)
        self.test_fingerprint = self.batches.test_fingerprint()
        self.method = build_method(cfg.method)
        shape, classes = data.input_shape, data.num_classes
        if cfg.bus.encoding == "topk" and cfg.bus.k > classes:  # C known from the data
            raise ConfigError(
                f"config error: bus.k: {cfg.bus.k} classes kept per row, but the data has "
                f"{classes} classes"
            )
        self.method_inputs = inputs = MethodInputs(self.method, cfg.run, shape, classes)
        # another run's final weights to start from (train.init_from), checked before building
        self.init_source = source_record(cfg, source_summary(cfg))
        replicas = placement.replicas
        shard = sharding(replicas)  # cohort.shard: fsdp: a student sharded over its replicas
        self.peers: dict[int, Peer] = {
            i: build_peer(
                cfg, i, shape, classes, placement.device_of(i), inputs, replicas.index, shard
            )
            for i in placement.hosted
        }
        for peer in self.peers.values():  # a data-parallel student trains through DDP
            replicate(peer, replicas)
        # device events where the peers step on a GPU, the host clock on the CPU
        self.timer = step_timer({placement.device, *map(placement.device_of, placement.hosted)})
        self.students = [i for i, p in enumerate(cfg.peers) if p.role == "student"]
        self.teachers = [i for i, p in enumerate(cfg.peers) if p.role == "teacher"]
        self.per_epoch = max(steps_per_epoch(self.batches.num_train, cfg.data.batch_size), 1)
        # the steps the run trains in all: what a per-step schedule spans
        every_epoch = self.per_epoch * cfg.train.epochs
        self.total_steps = min(cfg.train.max_steps or every_epoch, every_epoch)
        self.run_dir = cfg.run.dir
        self.checkpoints = CohortCheckpoints(cfg, self.run_dir, replicas.index)
        # a data-parallel peer's log is its first replica's (the others write nothing)
        logged = self.peers if replicas.first else {}
        self.peer_logs = {
            i: JsonlLog(self.run_dir / "peers" / f"{p.name}.jsonl") for i, p in logged.items()
        }
        self.cohort_log = JsonlLog(self.run_dir / "cohort.jsonl") if placement.reporter else None
        devices = {i: str(placement.device_of(i)) for i in self.peers}
        run_log = RunLog(
            self.peer_logs, self.cohort_log, self.names, cfg.run.log_every, cfg.train.epochs,
            devices,
        )  # fmt: skip
        self.observers.insert(0, run_log)
        # a peer good on its training batches and at chance in evaluation: one warning line
        models = {i: p.model for i, p in self.peers.items()}
        rows = self.batches.num_test * cfg.data.rows_per_sample  # a text's positions
        watch = ChanceWatch(self.names, models, self.peer_logs, classes, rows, cfg.run.log_every)
        self.observers.insert(1, watch)
        self.clock = RunClock(self.run_dir / CLOCK_FILE if placement.reporter else None)
        if placement.reporter and cfg.run.progress_every_s > 0:
            max_steps = cfg.train.max_steps or cfg.train.epochs * self.per_epoch
            unit = "tokens" if self.tokens else "samples"
            plan = RunPlan(self.per_epoch, max_steps, cfg.train.epochs, replicas.count, unit)
            every = cfg.run.progress_every_s
            self.observers.append(ProgressDisplay(plan, self.names, self.clock, every, sys.stderr))

    def observe(self, observers: Sequence[Observer]) -> None:
        """Add observers (the metrics endpoint) after the run log, before the progress line."""
        self.observers[1:1] = observers

    # -- one step ---------------------------------------------------------------------------

    def _update(
        self, i: int, logits: Tensor, y: Tensor, log_ps: dict[int, Tensor], step: int, given: Given,
        labelled: Tensor | None = None,
    ) -> LossParts:  # fmt: skip
        """Student i's loss on the step, backward, optimizer step (the caller enters its stream).
        `given`: what its method declared it reads beyond logits (already on its device);
        `labelled`: a data-parallel replica's count for masked means (`StepView.labelled`)."""
        progress = Progress(step // self.per_epoch, step, self.per_epoch)
        on = logits.device  # the others' predictions (and teachers') come to this peer's device
        others = all_on([log_ps[j] for j in self.students if j != i], on)
        peers = [Predictions.of(p) for p in others]
        teachers = [Predictions.of(p) for p in all_on([log_ps[j] for j in self.teachers], on)]
        peer = self.peers[i]
        view = StepView(
            i, peers, teachers, progress, given.features, given.teacher, given.sample_ids,
            peer.extras, labelled,
        )  # fmt: skip
        with autocast(self.cfg.run.precision, on):  # a method's own modules (hints) too
            parts = self.method(logits.float(), y.to(on), view)  # losses in float32
        optim = self.cfg.optim
        set_learning_rate(peer.optimizer, peer.scheduler, optim.schedule, step, self.total_steps)
        peer.optimizer.zero_grad(set_to_none=True)
        if peer.scaler is None:
            parts.total.backward()
            if optim.grad_clip is not None:
                clip_gradients(peer.optimizer, optim.grad_clip)
            peer.optimizer.step()
        else:  # fp16: scaled loss, unscaled step skipped on inf/nan, scale adapted
            peer.scaler.scale(parts.total).backward()
            if optim.grad_clip is not None:  # the true gradients' norm
                peer.scaler.unscale_(peer.optimizer)
                clip_gradients(peer.optimizer, optim.grad_clip)
            peer.scaler.step(peer.optimizer)
            peer.scaler.update()
        return parts

    def _input(self, i: int, x: Tensor) -> Tensor:
        """The batch on peer i's device, in its model's memory layout."""
        x = x.to(self.placement.device_of(i), non_blocking=True)
        return to_layout(x, self.cfg.run.channels_last)

    def _log_probs(self, logits: Tensor) -> Tensor:
        """What a peer publishes: float32 log-probabilities (whatever its autocast dtype), on
        the process's exchange device."""
        return F.log_softmax(logits.detach().float(), dim=1).to(self.placement.device)

    def _forward(self, peer: Peer, x: Tensor) -> Tensor:
        """A student's training forward; a teacher's in eval mode without a graph. Either on the
        peer's own random stream (dropout masks, drop-path: alike in every layout). Logits as
        rows (a language model's: one per position)."""
        x = self._input(peer.index, x)
        with peer.stream:
            if not peer.is_teacher:
                return as_rows(peer.train_forward(x))  # through DDP for a data-parallel student
            with torch.no_grad():
                return as_rows(peer.model(x))

    def _exchange(
        self, key: StepKey, local: dict[int, Tensor], senders: Sequence[int]
    ) -> dict[int, Tensor]:
        waited = self.bus.stats.wait_seconds
        out = self.bus.exchange(key, local, senders, receivers=self.students)
        self.timer.mark(EXCHANGE)
        self._wait_seconds += self.bus.stats.wait_seconds - waited
        return out

    def train_step(
        self, x: Tensor, y: Tensor, step: int, fp: int, sample_ids: Tensor | None = None
    ) -> StepResult:
        """One lockstep step: every hosted peer predicts, students learn, teachers only publish.

        Only students receive: a teacher publishes its predictions and never waits for anyone's
        during training (under zmq it may run ahead by at most `bus.window` steps).
        `sample_ids`: the batch's dataset indices (for a method that declares it reads them).
        """
        self._wait_seconds = 0.0
        self.timer.start()
        logits, features = {}, {}
        for i, p in self.peers.items():
            with self.method_inputs.recording(i) as features[i]:  # what the method declared
                logits[i] = self._forward(p, x)
        local = {i: self._log_probs(z) for i, z in logits.items()}
        self.timer.mark(FORWARD)
        log_ps = self._exchange(StepKey(step, 0, fp), local, range(self.size))
        received = dict(log_ps)  # the batch's (round 0's): sparse rows stay sparse (no B x C)
        encoded = {j: describe(p) for j, p in log_ps.items() if not isinstance(p, Tensor)}
        learners = [i for i in self.students if i in self.peers]
        given = self.method_inputs.gather(
            learners, self.placement.device_of, lambda i: self._input(i, x), features, sample_ids
        )
        parts: dict[int, LossParts] = {}
        labelled = self._labelled(y, learners)
        if self.cfg.cohort.update == "simultaneous":
            for i in learners:
                with self.peers[i].stream:  # a peer's draws come from its own stream
                    parts[i] = self._update(i, logits[i], y, log_ps, step, given[i], labelled)
            self.timer.mark(UPDATE)
        else:
            # sequential (the paper's Algorithm 1): the r-th student updates in round r, after the
            # previous one has re-published its predictions on the same batch with its freshly
            # updated weights. Teachers do not change, so they take no round.
            for r, i in enumerate(self.students):
                if r > 0:
                    prev = self.students[r - 1]
                    fresh = {}
                    if prev in self.peers:
                        model = self.peers[prev].model
                        with self.peers[prev].stream:  # its dropout draws on
                            fresh_logits = as_rows(refresh_predictions(model, self._input(prev, x)))
                        fresh = {prev: self._log_probs(fresh_logits)}
                    self.timer.mark(FORWARD)
                    log_ps.update(self._exchange(StepKey(step, r, fp), fresh, [prev]))
                if i in self.peers:
                    with self.peers[i].stream:
                        parts[i] = self._update(i, logits[i], y, log_ps, step, given[i], labelled)
                self.timer.mark(UPDATE)
        return StepResult(parts, received, self.timer.stop(self._wait_seconds), encoded)

    def _labelled(self, y: Tensor, learners: Sequence[int]) -> Tensor | None:
        """A data-parallel student's count for masked means: the labelled rows of its peer's
        whole batch over the replicas (only where labels may be missing: a semi-supervised
        run); None otherwise (the batch's own count, as in one process per peer)."""
        replicas = self.placement.replicas
        if not (replicas.active and learners and self.batches.labels is not None):
            return None
        return replicas.whole_batch_share(y != UNLABELLED)

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, after_step: int) -> dict[str, Any]:
        """Every hosted peer predicts the test set, `eval_batch_size` rows at a time; the bus
        brings the others' predictions chunk by chunk (`exchange_evaluation`)."""
        bs = self.cfg.data.eval_batch_size
        labels: list[Tensor] = []

        def chunks() -> Iterator[dict[int, Tensor]]:
            for x, y in self.batches.test_batches():  # read once for every hosted peer
                labels.append(y)
                yield {i: predict(p.model, x, bs) for i, p in self.peers.items()}

        students = [self.names[i] for i in self.students]
        if self.tokens:  # per position, each chunk measured as it arrives (no per-class table)
            tokens = TokenEvaluation(self.names, ensemble_of=students)
            for c, got in enumerate(self.exchange_evaluation(after_step, chunks())):
                tokens.add({self.names[i]: got[i] for i in range(self.size)}, labels[c])
            return tokens.result()
        received: dict[int, list[Tensor]] = {i: [] for i in range(self.size)}
        for got in self.exchange_evaluation(after_step, chunks()):
            for i in range(self.size):
                received[i].append(got[i])
        named = {self.names[i]: torch.cat(received[i]) for i in range(self.size)}
        test_y = torch.cat(labels)
        return evaluate_cohort(named, test_y, self.data.num_classes, ensemble_of=students)

    def exchange_evaluation(
        self, after_step: int, chunks: Iterable[Mapping[int, Tensor]]
    ) -> Iterator[dict[int, Tensor]]:
        """The cohort's predictions on evaluation rows, one chunk at a time: each of `chunks`
        holds the hosted peers' log-probabilities [rows, C] on the same rows in every process
        (a chunk of the test set, or of a text's token positions); for each, every peer's
        [rows, C] float32 log-probabilities, bit for bit as that peer computed them: the
        evaluation measures the models, so its exchange travels dense float32 (`FLOAT32`)
        whatever bus.encoding is (training exchanges keep bus.encoding). Chunk c travels as
        round EVAL_ROUND + c of `after_step`, so no message holds more than a chunk (a large C
        or a long validation text fits in memory); the start-up timeout is the patience
        throughout (peers evaluate at their own pace: a compiled model compiles its eval graph
        the first time)."""
        patience = self.bus.patience_s
        self.bus.set_patience(self.cfg.bus.startup_timeout_s)
        try:
            for c, local in enumerate(chunks):
                key = StepKey(after_step, EVAL_ROUND + c, self.test_fingerprint)
                yield self.bus.exchange(key, local, range(self.size), encoding=FLOAT32)
        finally:
            self.bus.set_patience(patience)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        # Everything built so far (torch, the data, the models) lives for the whole run: frozen,
        # a full garbage collection no longer walks its ~350k objects (200-300 ms each time, a
        # stall the whole lockstep cohort waits for; benchmarks/METRICS.md).
        gc.collect()
        gc.freeze()
        try:
            return self._run()
        finally:
            self.stop.disarm()
            self.batches.close()  # the loader workers, also when stopped by a signal
            gc.unfreeze()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        # never 0: prepare_data refuses a batch larger than the training split
        per_epoch = steps_per_epoch(self.batches.num_train, cfg.data.batch_size)
        max_steps = cfg.train.max_steps or cfg.train.epochs * per_epoch
        if self.placement.reporter:
            self.prepared.record(self.run_dir / DATA_FILE)
        restored = self._resume(per_epoch, max_steps)
        if self.placement.reporter:  # the config of this start (a refused resume leaves it)
            record_config(self.run_dir, cfg.to_dict())
        self.stop.arm()  # from here a SIGTERM stops the cohort at an agreed step, saved
        at = restored.position if restored else Position(0, 0, 0)
        history: list[dict[str, Any]] = restored.history if restored else []
        step = at.step
        # the first steps may wait for a peer still compiling (run.compile), or one whose data
        # took longer to load: the start-up timeout, then the steady-state one (a teacher under
        # zmq runs up to bus.window steps ahead of a student still on its first step)
        ahead = cfg.bus.window if cfg.bus.transport == "zmq" and self.teachers else 0
        patient_until = step + 1 + ahead
        self.bus.set_patience(cfg.bus.startup_timeout_s)
        for epoch in range(at.epoch, cfg.train.epochs):
            if step >= max_steps:
                break
            first = at.step_in_epoch if epoch == at.epoch else 0
            stop = min(per_epoch, first + max_steps - step)
            for s, idx, x, y in self.batches.epoch(epoch, first, stop):
                result = self.train_step(x, y, step, self.batches.fingerprint(idx), idx)
                if step + 1 == patient_until:
                    self.bus.set_patience(None)
                self._observe_step(step, epoch, y, result)
                step += 1
                stopping = self.stop.after(step)  # every step: the cohort's agreed stop
                if s + 1 < per_epoch and step < max_steps:  # mid-epoch (ends save below)
                    if stopping or self.checkpoints.due(step):
                        self._checkpoint(Position(epoch, s + 1, step), history)
                    if stopping:
                        raise self._preempted(step)
            for peer in self.peers.values():
                step_schedule(peer.optimizer, peer.scheduler)
            last = epoch == cfg.train.epochs - 1 or step >= max_steps
            replicas = self.placement.replicas
            # a peer's replica 0 evaluates it; a sharded peer's forward needs all its replicas
            evaluates = replicas.first or replicas.sharded
            if ((epoch + 1) % cfg.train.eval_every == 0 or last) and evaluates:
                report = self.evaluate(step - 1)
                if replicas.first:  # a sharded peer's other replicas report nothing
                    self._evaluated(epoch, step, report, history)
            if self.checkpoints.enabled:
                self._checkpoint(Position(epoch + 1, 0, step), history)
            if self.stop.stop_at is not None and step >= self.stop.stop_at and step < max_steps:
                raise self._preempted(step)  # asked to stop at this epoch's end: saved just now
        summary = self._finish(history, step, self.clock.elapsed())
        self.stop.disarm()  # trained and saved: a SIGTERM from here on (metrics.linger_s) stops
        for observer in self.observers:
            observer.on_end(summary)
        return summary

    def _evaluated(
        self, epoch: int, step: int, report: dict[str, Any], history: list[dict[str, Any]]
    ) -> None:
        """Record an evaluation after `epoch` in the history and tell the observers."""
        history.append({"epoch": epoch + 1, "step": step, **report})
        evaluated = EvalEvent(
            epoch + 1,
            step,
            report,
            dataclasses.replace(self.bus.stats),
            self.clock.elapsed(),  # the run's, resumes included
        )
        for observer in self.observers:
            observer.on_eval(evaluated)

    # -- checkpoints ------------------------------------------------------------------------

    def _preempted(self, step: int) -> Preempted:
        """The cohort stopped on SIGTERM after saving at `step`: a record in every log."""
        for log in [*self.peer_logs.values(), self.cohort_log]:
            if log is not None:
                log.write("preempted", step=step, signal="SIGTERM")
        return Preempted(step)

    def _checkpoint(self, at: Position, history: list[dict[str, Any]]) -> None:
        """Save the hosted peers; the cohort confirms over the control channel. Every process
        saves at the same steps, so a teacher running ahead waits there for the students."""
        streams, wholes = None, None
        replicas = self.placement.replicas
        if replicas.active:  # every replica's stream in replica 0's file
            streams = {
                i: gather_streams(self.control, at.step, p.stream, i, replicas)
                for i, p in self.peers.items()
            }
        if replicas.sharded:  # the whole state from the shards (every replica gathers)
            wholes = {
                i: (self._model_state(p), whole(p.optimizer.state_dict(), replicas.first))
                for i, p in self.peers.items()
            }
        self.checkpoints.save(at, self.peers, history, self.control, streams, wholes)
        self.clock.record(at.step)

    def _resume(self, per_epoch: int, max_steps: int) -> Restored | None:
        """Load the newest checkpoint complete for the whole cohort, if there is one."""
        enabled = self.checkpoints.enabled
        restored = self.checkpoints.restore(self.peers, self.control) if enabled else None
        if restored is None:
            if self.init_source is not None and self.placement.reporter:
                print(starting_line(self.init_source), flush=True)
            return None
        at = restored.position
        standing = self.checkpoints.standing
        if standing.changed and at.step_in_epoch == 0 and at.step != at.epoch * per_epoch:
            raise CheckpointError(
                f"{self.run_dir} stopped at train.max_steps in the middle of an epoch (step "
                f"{at.step}, {per_epoch} steps per epoch): a run planned longer would have "
                f"finished that epoch, so it cannot carry on with {'; '.join(standing.changed)}; "
                f"start a new run from its final weights: --init-from {self.run_dir} "
                "--set run.name=NEW"
            )
        self.clock.carry_on()
        where = dict(step=at.step, epoch=at.epoch, step_in_epoch=at.step_in_epoch)
        for log in self.peer_logs.values():
            log.write("resume", **where, checkpoint=str(restored.folder))
        if self.cohort_log is not None:
            self.cohort_log.write("resume", **where, checkpoint=str(restored.folder))
            note = standing.note(self.run_dir, self.cfg.optim.schedule.name)
            if note is not None:
                print(note, flush=True)
            if at.step >= max_steps or at.epoch >= self.cfg.train.epochs:
                where_text = f"the end of training ({at.epoch} epochs): writing the results"
            else:
                where_text = f"epoch {at.epoch + 1}, step {at.step_in_epoch} of it"
            print(f"resuming at step {at.step} ({where_text}) from {restored.folder}", flush=True)
        return restored

    # -- output -----------------------------------------------------------------------------

    def _observe_step(self, step: int, epoch: int, target: Tensor, result: StepResult) -> None:
        """Build the step's event once and hand it to every observer. The batch statistics (the
        costly part) are computed only on steps some observer asks for, once for all of them;
        losses and times stay on the device until an observer's reporting step reads them."""
        event: StepEvent = build_step_event(
            step=step,
            epoch=epoch,
            target=target,
            parts=result.parts,
            log_ps=result.log_ps,
            lrs={i: p.optimizer.param_groups[0]["lr"] for i, p in self.peers.items()},
            times=result.times,
            bus=self.bus.stats,
            with_batch_stats=any(o.wants_batch_stats(step) for o in self.observers),
            encoded=result.encoded,
        )
        for observer in self.observers:
            observer.on_step(event)

    def _model_state(self, peer: Peer) -> dict[str, Any]:
        """The peer's model state dict, whole (a sharded peer's gathered: every replica calls
        this, replica 0 keeps the result)."""
        if not self.placement.replicas.sharded:
            return peer.model.state_dict()
        return whole(peer.model.state_dict(), self.placement.replicas.first)

    def _finish(self, history: list[dict[str, Any]], steps: int, wall: float) -> dict[str, Any]:
        finals = {i: self._model_state(p) for i, p in self.peers.items()}
        if not self.placement.replicas.first:  # replica 0 writes and reports the peer
            return {"run": self.cfg.run.name, "steps": steps, "wall_seconds": round(wall, 3)}
        final_dir = self.run_dir / "final"
        final_dir.mkdir(parents=True, exist_ok=True)
        for i, peer in self.peers.items():  # an hf: peer's save_pretrained copy first: a final
            write_pretrained(peer.model, finals[i], self.run_dir, peer.name)  # .pt: both there
            torch.save(finals[i], final_dir / f"{peer.name}.pt")
        for log in self.peer_logs.values():
            log.close()
        last = history[-1]
        summary: dict[str, Any] = {
            "run": self.cfg.run.name,
            "config_hash": self.cfg.hash(),
            "method": self.cfg.method.name,
            "update": self.cfg.cohort.update,
            "transport": self.cfg.bus.transport,
            "cohort_size": self.size,
            "steps": steps,
            "epochs": last["epoch"],
            "wall_seconds": round(wall, 3),  # the run's: every attempt's training time
            "peers": {},
            "class_names": list(getattr(self.data, "class_names", ())),
        }
        for i, name in enumerate(self.names):
            accs = [h["peers"][name]["accuracy"] for h in history]
            best = max(range(len(accs)), key=accs.__getitem__)
            summary["peers"][name] = {
                "model": self.cfg.peers[i].model,
                "role": self.cfg.peers[i].role,
                "final_accuracy": accs[-1],
                "best_accuracy": accs[best],
                "best_epoch": history[best]["epoch"],
                "final_entropy": last["peers"][name]["entropy"],
            }
            if self.tokens:  # validation loss (nats per token) and perplexity
                final = last["peers"][name]
                summary["peers"][name].update(
                    final_nll=final["nll"], final_perplexity=final["perplexity"]
                )
            else:
                summary["peers"][name]["per_class"] = last["peers"][name]["per_class"]
        ens = [h["ensemble"]["accuracy"] for h in history]
        summary["ensemble"] = {"final_accuracy": ens[-1], "best_accuracy": max(ens)}
        if self.tokens:
            ensemble = last["ensemble"]
            summary["ensemble"].update(
                final_nll=ensemble["nll"], final_perplexity=ensemble["perplexity"]
            )
        if self.init_source is not None:  # where the students' initial weights came from
            summary["init_from"] = self.init_source
        if self.cohort_log is not None:
            self.cohort_log.close()
            write_json_atomic(self.run_dir / "summary.json", summary)
            table = (
                token_table(last) if self.tokens else per_class_table(last, self.data.class_names)
            )
            print(table, flush=True)
            print(f"summary: {self.run_dir / 'summary.json'}", flush=True)
        return summary
