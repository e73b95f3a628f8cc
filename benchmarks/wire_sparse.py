"""Bytes and time per exchange of each bus.encoding: dense fp32 / bf16, top-k, sampled.

Part 1, bytes (no processes): for each class count C and rows (B = 256 samples; B x T = 4,096
token positions for the 32k vocabulary) a peer's [rows, C] log-probabilities are encoded as a
transport encodes them (`Encoding.send`, then the payload bytes) and the message is counted,
headers included: zmq (the 56-byte wire header + payload) and torch (its 48-byte header +
payload). A peer sends one message to each of the K - 1 others per exchange and receives K - 1.
Ratios are to dense float32 on the same transport. Sparse values in bfloat16 (bus.sparse_dtype's
default), indices in the smallest integer type holding C, sampled counts in the smallest holding
n; sampled rows have n slots per row whatever the distinct ids, so their bytes do not depend on
the values (sampled's distinct ids per row are reported beside n).

Part 2, time (`--time`): K worker processes (one thread each, their own sessions) join a gloo
group; for each transport (zmq over tcp, torch over gloo), C and encoding, each builds the real
bus of that encoding and times `Bus.exchange` of its [rows, C] float32 log-probabilities (the
encoding, the draw or top-k included, the transfer and the decode), after one warm-up exchange
for C <= 1,000. Reported: the median over exchanges of rank 0's wall time, and the bytes rank 0
sent and received per exchange as its bus counted them (headers included). At C = 32,000 and
K = 4 the dense encodings are left out: 3 x 524 MB received per peer (and its copies) in 4
processes does not fit this machine's memory next to its other work.

Run from the repo root: .venv/bin/python benchmarks/wire_sparse.py [--quick] [--time]
(--quick: C = 10 and 1,000 only.)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import machine, own_session, provenance_lines  # noqa: E402

from dml_cluster.bus.base import StepKey  # noqa: E402
from dml_cluster.bus.encoding import Encoding, payload_bytes  # noqa: E402
from dml_cluster.bus.torch_bus import _HEADER_BYTES as TORCH_HEADER  # noqa: E402
from dml_cluster.bus.torch_bus import TorchBus  # noqa: E402
from dml_cluster.bus.wire import HEADER  # noqa: E402
from dml_cluster.bus.zmq_bus import ZmqBus  # noqa: E402
from dml_cluster.sparse_rows import Sampled  # noqa: E402

SHAPES = [(10, 256), (1000, 256), (32000, 4096)]
ENCODINGS = [
    ("dense float32", Encoding("float32")),
    ("dense bfloat16", Encoding("bfloat16")),
    *[(f"top-{k}", Encoding("topk", k)) for k in (5, 16, 64)],
    *[(f"sampled-{n}", Encoding("sampled", samples=n)) for n in (12, 32)],
]
KEY = StepKey(0, 0, 1)
FINGERPRINT = 0x5EED


def log_probs(classes: int, rows: int, seed: int = 0) -> torch.Tensor:
    """Rows of a peaked distribution (logits randn * 3), as a trained network's are."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, classes, generator=g) * 3).log_softmax(dim=1)


def usable(encoding: Encoding, classes: int) -> bool:
    return not (encoding.name == "topk" and encoding.k > classes)


# -- part 1: bytes --------------------------------------------------------------------------


def bytes_tables(shapes: list[tuple[int, int]]) -> None:
    for classes, rows in shapes:
        log_p = log_probs(classes, rows)
        print(f"\n### C = {classes:,}, rows = {rows:,}\n")
        print(
            "| encoding | payload B | zmq message B | vs fp32 | torch message B | vs fp32 | "
            "K=2 sent/peer B | K=4 sent/peer B | kept mass | distinct ids/row |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for name, encoding in ENCODINGS:
            if not usable(encoding, classes):
                continue
            sent = encoding.send(log_p, KEY, 0)
            payload = payload_bytes(sent).numel()
            zmq_b, torch_b = HEADER.size + payload, TORCH_HEADER + payload
            base = base or (zmq_b, torch_b)
            kept = distinct = "-"
            if not isinstance(sent, torch.Tensor):
                kept = f"{float(sent.kept_mass().mean()):.3f}"
            if isinstance(sent, Sampled):
                distinct = f"{float(sent.distinct().float().mean()):.2f}"
            print(
                f"| {name} | {payload:,} | {zmq_b:,} | {base[0] / zmq_b:,.1f}x | {torch_b:,} | "
                f"{base[1] / torch_b:,.1f}x | {zmq_b:,} | {3 * zmq_b:,} | {kept} | {distinct} |"
            )


# -- part 2: time on the real buses ---------------------------------------------------------


def cells(world: int, shapes: list[tuple[int, int]]) -> list[tuple[str, int, int, str]]:
    """(transport, C, rows, encoding name) of every timed cell for a cohort of `world`."""
    out = []
    for transport in ("zmq", "torch"):
        for classes, rows in shapes:
            for name, encoding in ENCODINGS:
                if not usable(encoding, classes):
                    continue
                if world > 2 and classes >= 32000 and not encoding.sparse:
                    continue  # memory: see the module's docstring
                out.append((transport, classes, rows, name))
    return out


def make_bus(transport: str, encoding: Encoding, rank: int, world: int, store, tag: int):
    names = [f"peer{r}" for r in range(world)]
    if transport == "torch":
        return TorchBus(
            rank=rank, world=world, names=names, device=torch.device("cpu"), encoding=encoding
        )
    run_id = hashlib.sha256(f"wire-sparse/{os.getppid()}/{tag}".encode()).digest()[:8]
    return ZmqBus(
        rank=rank, world=world, names=names, run_id=run_id, config_hash="0" * 16, store=store,
        address="127.0.0.1", timeout_s=600.0, encoding=encoding,
    )  # fmt: skip


def worker(rank: int, world: int, port: int, shapes, iters: int, queue) -> None:
    own_session()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=900),
    )  # fmt: skip
    store = dist.distributed_c10d._get_default_store()
    encodings = dict(ENCODINGS)
    data: dict[int, torch.Tensor] = {}
    out = []
    for tag, (transport, classes, rows, name) in enumerate(cells(world, shapes)):
        if classes not in data:
            data.clear()  # one class count's rows at a time
            data[classes] = log_probs(classes, rows, seed=rank)
        local = {rank: data[classes]}
        bus = make_bus(transport, encodings[name], rank, world, store, tag)
        warmup = 1 if classes <= 1000 else 0
        times = []
        dist.barrier()
        for step in range(warmup + iters):
            if step == warmup:
                before = bus.stats.copy()
            t0 = time.perf_counter()
            bus.exchange(StepKey(step, 0, FINGERPRINT), local, range(world))
            times.append(time.perf_counter() - t0)
        sent, received = bus.stats.per_exchange(before)
        dist.barrier()  # everyone has everything before the sockets close
        bus.close()
        out.append((transport, classes, rows, name, times[warmup:], sent, received))
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_tables(shapes: list[tuple[int, int]], ks: list[int], iters: int) -> None:
    for world in ks:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = free_port()
        procs = [
            ctx.Process(target=worker, args=(r, world, port, shapes, iters, queue), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join(120)
        print(f"\n### K = {world}\n")
        print(
            "| transport | C x rows | encoding | exchange ms (median) | sent B/exchange | "
            "received B/exchange | vs fp32 (bytes) |"
        )
        print("|---|---|---|---:|---:|---:|---:|")
        base: dict[tuple[str, int], float] = {}
        for transport, classes, rows, name, times, sent, received in results[0]:
            if name == "dense float32":
                base[transport, classes] = sent
            ref = base.get((transport, classes))
            ratio = f"{ref / sent:,.1f}x" if ref else "-"
            print(
                f"| {transport} | {classes:,} x {rows:,} | {name} | "
                f"{1000 * statistics.median(times):,.2f} | {sent:,.0f} | {received:,.0f} | "
                f"{ratio} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="C = 10 and 1,000 only")
    parser.add_argument("--time", action="store_true", help="also time the real buses")
    parser.add_argument("--iters", type=int, default=3, help="timed exchanges per cell")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    shapes = SHAPES[:2] if args.quick else SHAPES
    print(provenance_lines())
    print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
    bytes_tables(shapes)
    if args.time:
        time_tables(shapes, args.ks, args.iters)


if __name__ == "__main__":
    main()
