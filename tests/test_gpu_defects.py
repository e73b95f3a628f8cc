"""Issue 22's defects a first GPU run would hit, where a CPU can show them: host reads in a
step's losses and in a whole training step that reports nothing, received messages staged once,
loader workers kept across epochs and evaluations, tensors of different peers moved to one named
device, timeouts that tell a warm-up from a dead peer, the stop flag without a store round trip
every step, device timings read only when asked."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dml_cluster import evaluation, losses, timing
from dml_cluster.bus.base import StepKey
from dml_cluster.bus.local import LocalBus
from dml_cluster.bus.torch_bus import TorchBus
from dml_cluster.bus.wire import ENCODING_IDS, Header, Kind, decode, encode
from dml_cluster.config import load_config, parse_config
from dml_cluster.data.dataset import Dataset, Normalisation
from dml_cluster.data.loader import DataPath, StepSampler, read_batches
from dml_cluster.determinism import set_determinism
from dml_cluster.devices import all_on, on_one_device
from dml_cluster.errors import PeerError
from dml_cluster.method_config.dkd import DKDConfig
from dml_cluster.methods import Predictions, Progress, StepView, build_method
from dml_cluster.metrics import metrics_observers
from dml_cluster.metrics.progress import RunningCrossEntropy
from dml_cluster.preemption import CHECK_EVERY, CohortStop
from dml_cluster.run_folder import read_jsonl
from dml_cluster.trainer import CohortTrainer, Placement

from .conftest import REPO

CPU = torch.device("cpu")
_HOST_READS = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"}


class HostReads(TorchFunctionMode):
    """Records every tensor operation that reads values on the host (a device sync on an
    accelerator): .item(), bool(t), .tolist(), .cpu(), boolean-mask indexing..."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.reads.append(name)
        if name == "__getitem__" and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flat(args[1:])
        ):
            self.reads.append("boolean index")
        return func(*args, **(kwargs or {}))


def _flat(args: Any) -> list[Any]:
    out = []
    for a in args:
        out.extend(_flat(a) if isinstance(a, (tuple, list)) else [a])
    return out


# -- item 3: no host read in a step's losses ------------------------------------------------------


def test_cross_entropy_reads_nothing_on_the_host_and_keeps_its_values() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 5, requires_grad=True)
    target = torch.tensor([0, -1, 2, 3, -1, 4, 1, 0])
    with HostReads() as mode:
        ce = losses.cross_entropy(logits, target)
        none = losses.cross_entropy(logits, torch.full((8,), -1))
    assert mode.reads == []
    keep = target != -1
    # tolerance: a masked sum / count vs torch's mean over selected rows (summation order)
    assert torch.allclose(ce, F.cross_entropy(logits[keep], target[keep]), atol=1e-6)
    assert none.item() == 0.0
    none.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_dkd_reads_nothing_on_the_host_and_averages_the_labelled_rows() -> None:
    torch.manual_seed(1)
    method = build_method(DKDConfig(warmup_epochs=0))
    logits, teacher = torch.randn(6, 4), torch.randn(6, 4)
    target = torch.tensor([1, -1, 3, 0, -1, 2])
    view = StepView(0, [], [Predictions(teacher)], Progress(0, 0, 10))
    with HostReads() as mode:
        parts = method(logits, target, view)
        empty = method(logits, torch.full((6,), -1), view)
    assert mode.reads == []
    keep = target != -1
    tckd, nckd = losses.dkd_parts(logits[keep], teacher[keep], target[keep], 4.0)
    assert torch.allclose(parts.distill, 1.0 * tckd + 8.0 * nckd, atol=1e-5)  # alpha 1, beta 8
    assert empty.distill.item() == 0.0


class WatchedTrainer(CohortTrainer):
    """The trainer, recording the host reads of each step: its training step, its event and
    every observer's `on_step` (the data path before it reads host memory only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: dict[int, list[str]] = {}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int, *args: Any, **kw: Any):
        with HostReads() as mode:
            result = super().train_step(x, y, step, *args, **kw)
        self.reads[step] = mode.reads
        return result

    def _observe_step(self, step: int, *args: Any, **kwargs: Any) -> None:
        with HostReads() as mode:
            super()._observe_step(step, *args, **kwargs)
        self.reads[step] += mode.reads


def test_a_step_that_reports_nothing_reads_nothing_on_the_host(tmp_path: Path) -> None:
    """Semi-supervised DML without mimicry on unlabelled samples, with the run log, the metrics
    endpoint and the progress display watching: only the steps some observer reports (run log
    every 4, statistics every 3) read values on the host. The step's times come from the timer:
    the phases add up to the step, logged at the run log's steps."""
    cfg = load_config(
        REPO / "configs" / "digits-dml.yaml",
        [
            f"run.out_dir={tmp_path}", "metrics.port=0", "metrics.address=127.0.0.1",
            "cohort.model=mlp", "cohort.args={hidden: [32]}", "train.max_steps=8",
            "run.log_every=4", "metrics.stats_every=3", "data.label_fraction=0.5",
            "method.unlabelled_mimicry=false", "run.progress_every_s=3600", "data.workers=0",
        ],
    )  # fmt: skip
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    set_determinism(cfg)
    try:
        with metrics_observers(cfg, (0, 1), "x") as observers:
            trainer = WatchedTrainer(cfg, LocalBus(), Placement((0, 1), CPU, True), observers)
            assert any(type(o).__name__ == "ProgressDisplay" for o in trainer.observers)
            trainer.run()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    reporting = {0, 3, 4, 6}
    assert set(trainer.reads) == set(range(8))
    for step, reads in trainer.reads.items():
        assert bool(reads) == (step in reporting), (step, reads)
    for record in read_jsonl(cfg.run.dir / "peers" / "mlp-0.jsonl"):
        phases = [record[f"{p}_seconds"] for p in ("forward", "exchange", "update")]
        # tolerance: phases summed from float seconds vs the step's own difference (rounding)
        # float summation order
        assert min(phases) >= 0 and abs(sum(phases) - record["step_seconds"]) < 1e-6
    assert [r["step"] for r in read_jsonl(cfg.run.dir / "peers" / "mlp-0.jsonl")] == [0, 4]


def test_the_running_cross_entropy_sums_steps_put_aside() -> None:
    g = torch.Generator().manual_seed(5)
    running, steps = RunningCrossEntropy(), []
    for _ in range(RunningCrossEntropy.KEEP_STEPS + 3):  # one batch summed, three put aside
        log_ps = {i: torch.randn(6, 4, generator=g).log_softmax(1) for i in range(2)}
        y = torch.randint(-1, 4, (6,), generator=g)
        running.add(log_ps, y)
        steps.append((log_ps, y))
    assert len(running.kept) == 3
    for i, mean in running.means().items():
        log_p, y = torch.cat([s[0][i] for s in steps]), torch.cat([s[1] for s in steps])
        # tolerance: a running sum of per-step means vs one mean (summation order)
        # float summation order
        assert abs(mean - F.nll_loss(log_p, y, ignore_index=-1).item()) < 1e-6


# -- item 4: step times from the device, read on reporting steps only ------------------------


class FakeEvent:
    """A CUDA event's interface over a given time (ms): records nothing, counts the waits."""

    waits = 0

    def __init__(self, at: float) -> None:
        self.at = at

    def synchronize(self) -> None:
        FakeEvent.waits += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.at - self.at


def test_device_times_wait_only_when_read_and_take_each_phase_longest(monkeypatch) -> None:
    clock = iter([0.0, 3.0, 4.0, 10.0, 0.0, 5.0, 9.0, 11.0])  # device A's marks, then B's
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing: FakeEvent(0.0))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: device)
    monkeypatch.setattr(FakeEvent, "record", lambda self, stream: None, raising=False)
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    timer = timing.step_timer([*devices, CPU])
    assert isinstance(timer, timing.DeviceTimer) and timer.devices == devices
    assert isinstance(timing.step_timer([CPU]), timing.HostTimer)
    timer.start()
    for phase in timing.PHASES:
        timer.mark(phase)
    times = timer.stop(wait_seconds=0.25)
    for device in devices:  # give each device's events their times
        for _, event in timer._marks[device]:
            event.at = next(clock)
    FakeEvent.waits = 0
    assert times.wait_seconds == 0.25 and FakeEvent.waits == 0  # nothing read: no wait
    assert times.step_seconds == 0.011  # the longer device, start to end
    assert FakeEvent.waits == 2  # each device's last event, once
    assert times.forward_seconds == 0.005 and times.exchange_seconds == 0.004
    assert times.update_seconds == 0.006 and FakeEvent.waits == 2


def test_host_timer_adds_a_phase_marked_twice() -> None:
    timer = timing.HostTimer()
    timer.start()
    for phase in (timing.FORWARD, timing.EXCHANGE, timing.UPDATE, timing.FORWARD):
        time.sleep(0.002)
        timer.mark(phase)
    times = timer.stop()
    assert times.forward_seconds >= 0.004 and times.exchange_seconds >= 0.002
    phases = times.forward_seconds + times.exchange_seconds + times.update_seconds
    # tolerance: phases summed from float seconds vs the step's own difference (rounding)
    assert abs(phases - times.step_seconds) < 1e-9  # float summation order


def test_a_received_message_is_decoded_with_one_copy_in_its_wire_dtype() -> None:
    """`pinned` (CUDA only) keeps the wire dtype for the device to convert; without it the
    message comes back as float32, equal to what was sent."""
    x = torch.randn(3, 4)
    for encoding in ("float32", "bfloat16"):
        eid, payload = encode(x, encoding)
        head = Header(Kind.DATA, ENCODING_IDS[encoding], bytes(16), 0, 0, 0, 0, 0, 3, 4)
        got = decode(head, memoryview(payload.view(torch.uint8).numpy().tobytes()))
        assert got.dtype == torch.float32 and torch.equal(got, payload.float())
        assert eid == ENCODING_IDS[encoding]


# -- item 5: loader workers live for the run -----------------------------------------------


class PidSplit(torch.utils.data.Dataset):
    """Items whose reads note the reading process's id in a file."""

    def __init__(self, n: int, log: Path, offset: int = 0) -> None:
        self.n, self.log, self.offset = n, log, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return torch.full((1, 2, 2), (i + self.offset) % 251, dtype=torch.uint8), i % 2


def test_loader_workers_live_across_epochs_and_evaluations(tmp_path: Path) -> None:
    log = tmp_path / "pids"
    train, test = PidSplit(40, log), PidSplit(12, log, offset=100)
    ds = Dataset("pids", train, test, 2, ("a", "b"), (1, 2, 2), False)
    stats = Normalisation((0.0,), (1.0,))
    path = DataPath(ds, stats, CPU, batch_size=8, eval_batch_size=5, seed=4, workers=1,
                    prefetch=2, crop_padding=0, flip=False)  # fmt: skip
    seen = []
    for epoch in range(3):
        seen.append([(s, i.clone(), y.clone()) for s, i, _, y in path.epoch(epoch, 0, 4)])
        assert len(list(path.test_batches())) == 3
    pids = set(log.read_text().split()) - {str(os.getpid())}
    assert len(pids) == 2  # one worker for training, one for evaluation, for the whole run
    for epoch, steps in enumerate(seen):  # the batches of a loader made for each epoch
        fresh = read_batches(path.train, StepSampler(40, 8, 4, epoch, 0, 4), 0)
        for (_, idx, y), batch in zip(steps, fresh, strict=True):
            assert torch.equal(idx, batch.indices) and torch.equal(y, batch.y)
    resumed = [(s, i) for s, i, _, _ in path.epoch(1, 2, 4)]
    assert [s for s, _ in resumed] == [2, 3]
    assert all(torch.equal(i, seen[1][s][1]) for s, i in resumed)


# -- item 1: peers' tensors meet on one named device ----------------------------------------------


def test_peers_tensors_meet_on_the_device_named(monkeypatch) -> None:
    a, b = torch.ones(2), torch.ones(2, device="meta")
    moved = on_one_device({0: a, 1: b}, "meta")
    assert all(t.device.type == "meta" for t in moved.values()) and moved[1] is b
    assert all_on([a, a], CPU)[0] is a  # already there: no copy
    calls = []

    def spy(tensors, device):
        calls.append(torch.device(device))
        return on_one_device(tensors, device)

    monkeypatch.setattr(evaluation, "on_one_device", spy)
    y = torch.tensor([0, 1, 1])
    log_ps = {"a": torch.randn(3, 2).log_softmax(1), "b": torch.randn(3, 2).log_softmax(1)}
    evaluation.evaluate_cohort(log_ps, y, 2)
    assert calls == [CPU]


# -- item 2: a warm-up is not a dead peer; a dead peer is one line ------------------------


def _peer(rank: int, port: int, out: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))  # fmt: skip
    bus = TorchBus(rank=rank, world=2, names=["a", "b"], device=CPU, timeout_s=1.0, store=store)
    t0 = time.monotonic()
    try:
        bus.set_patience(8.0)  # start-up
        if rank == 1:
            time.sleep(2.5)  # compiling: longer than timeout_s, within the start-up timeout
        bus.exchange(StepKey(0, 0, 7), {rank: torch.full((2, 3), float(rank))}, range(2))
        bus.set_patience(None)
        if rank == 1:
            os._exit(0)  # dies before step 1
        t0 = time.monotonic()
        bus.exchange(StepKey(1, 0, 7), {rank: torch.zeros(2, 3)}, range(2))
        out.send("no error")
    except PeerError as err:
        out.send(f"{time.monotonic() - t0:.1f} {err}")
    except BaseException as err:  # noqa: BLE001 - reported to the test
        out.send(f"-1 {type(err).__name__}: {err}")
    os._exit(0)


def test_a_slow_start_waits_and_a_dead_peer_is_one_line_naming_it() -> None:
    ctx = mp.get_context("fork")
    out, into = ctx.Pipe(duplex=False)  # a pipe: sent at once (a Queue's thread is not)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_peer, args=(r, port, into)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        assert out.poll(30), "rank 0 reported nothing"
        line = out.recv()
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    seconds, message = line.split(" ", 1)
    assert "\n" not in message and "peer 1 (b)" in message, message
    assert "step 1 round 0" in message and "last step exchanged with the cohort: 0" in message
    assert float(seconds) < 4.5  # the steady-state timeout (1 s) and the way out, not 30 s


# -- item 3: the stop flag without a store round trip every step -----------------------------------


class CountingStore:
    """A dict standing in for the rendezvous store, counting reads."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.reads = 0

    def check(self, keys: list[str]) -> bool:
        self.reads += 1
        return all(k in self.data for k in keys)

    def get(self, key: str) -> bytes:
        self.reads += 1
        return self.data[key]

    def compare_set(self, key: str, expected: bytes, value: bytes) -> bytes:
        self.data.setdefault(key, value)
        return self.data[key]


def test_the_stop_step_is_read_from_the_store_every_few_steps_and_agreed() -> None:
    cfg = parse_config({"cohort": {"size": 2, "model": "mlp"}})
    store = CountingStore()
    signalled, other = CohortStop(cfg, store, "k", 1), CohortStop(cfg, store, "k", 1)
    for done in range(1, 21):
        assert not other.after(done)
    assert store.reads == 20 // CHECK_EVERY  # not one round trip per step
    signalled.signalled = True
    assert not signalled.after(21)  # proposes the next multiple at least `margin` ahead
    stop = signalled.stop_at
    assert stop is not None and stop % CHECK_EVERY == 0 and stop >= 22
    done = 21
    while not other.after(done):  # the other peer, a step behind or ahead, stops there too
        done += 1
    assert done == stop == other.stop_at and signalled.after(stop)
