"""Exchange latency of the real buses (zmq tcp, zmq ipc, torch/gloo) next to their floors.

K worker processes (one thread each, each in its own session like torchrun's) join a gloo
process group; the zmq buses find each other through its store, as under torchrun. For every
transport and payload B x C (float32 log-probabilities), each worker times many back-to-back
`Bus.exchange` calls after a warm-up; the per-call times of all workers are pooled into a median
and a p99.

Floors, measured in the same run:
- memcpy: `dst.copy_(src)` of the payload in one process (the cost of touching the bytes once);
- 1-byte round trip: rank 0 -> rank 1 -> rank 0 on the transport itself (raw zmq PUSH/PULL
  sockets over tcp or ipc; gloo send/recv);
- 1-byte exchange: the bus's own pattern with no bus logic, each of the K ranks sending 1 byte to
  every other and waiting for K-1 (raw zmq sockets; gloo all_gather of a 1-element tensor);
- raw multipart (zmq only): the same pattern on the same raw sockets, but each message is the
  bus's two frames, a wire header of `wire.HEADER.size` bytes and the payload's bytes, sent and
  received zero-copy as the bus does; the difference to the bus is the bus's own Python work
  (header pack and checks, encode/decode, the copy on receipt).
Also measured: the CPU time of each `Bus.exchange` call (time.process_time: all threads of the
process, the zmq I/O thread and gloo's included), next to its wall time.

Run from the repo root: .venv/bin/python benchmarks/exchange_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import zmq  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    machine,
    markdown_table,
    own_session,
    provenance,
    provenance_lines,
    summary_us,
)  # noqa: E402

from dml_cluster.bus.base import Bus, StepKey  # noqa: E402
from dml_cluster.bus.torch_bus import TorchBus  # noqa: E402
from dml_cluster.bus.wire import HEADER  # noqa: E402
from dml_cluster.bus.zmq_bus import ZmqBus  # noqa: E402

TRANSPORTS = ("zmq-tcp", "zmq-ipc", "torch-gloo")
PAYLOADS = ((128, 10), (128, 100), (256, 1000))
FINGERPRINT = 0x5EED_5EED_5EED_5EED


# -- floors ----------------------------------------------------------------------------------


def memcpy_floor(rows: int, cols: int, iters: int) -> dict[str, float]:
    """Time `dst.copy_(src)` of a float32 [rows, cols] tensor in this process."""
    src, dst = torch.randn(rows, cols), torch.empty(rows, cols)
    for _ in range(20):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return summary_us(times)


class RawZmq:
    """Plain PUSH/PULL sockets wired like the bus (one inbox per rank), with no bus logic."""

    def __init__(self, rank: int, world: int, store: dist.Store, tag: str, ipc: bool) -> None:
        self.rank, self.world = rank, world
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.path = Path(f"/tmp/dml-bench-{tag}-{rank}.sock") if ipc else None
        if self.path is not None:
            endpoint = f"ipc://{self.path}"
            self.inbox.bind(endpoint)
        else:
            endpoint = f"tcp://127.0.0.1:{self.inbox.bind_to_random_port('tcp://127.0.0.1')}"
        store.set(f"raw/{tag}/{rank}", endpoint)
        self.out: dict[int, zmq.Socket] = {}
        for other in range(world):
            if other != rank:
                sock = self.ctx.socket(zmq.PUSH)
                sock.connect(store.get(f"raw/{tag}/{other}").decode())
                self.out[other] = sock
        self.early: dict[int, int] = {}

    def round_trip(self, peer: int) -> None:
        """Rank 0 sends one byte to `peer` and waits for it to come back; `peer` echoes."""
        if self.rank == 0:
            self.out[peer].send(b"x")
            self.inbox.recv()
        else:
            self.inbox.recv()
            self.out[0].send(b"x")

    def exchange(self, i: int) -> None:
        """Send one byte (iteration i mod 256) to every rank; wait for one from every rank."""
        tag = bytes([i % 256])
        for sock in self.out.values():
            sock.send(tag)
        need = self.world - 1 - self.early.pop(i % 256, 0)
        while need:
            got = self.inbox.recv()[0]
            if got == i % 256:
                need -= 1
            else:  # a fast peer's next iteration
                self.early[got] = self.early.get(got, 0) + 1

    def exchange_multipart(self, i: int, body: memoryview) -> None:
        """Like `exchange`, but each message is [a wire-header-sized frame, body], zero-copy."""
        header = bytes([i % 256]) + bytes(HEADER.size - 1)
        for sock in self.out.values():
            sock.send_multipart([header, body], copy=False)
        need = self.world - 1 - self.early.pop(i % 256, 0)
        while need:
            got = self.inbox.recv_multipart(copy=False)[0].buffer[0]
            if got == i % 256:
                need -= 1
            else:  # a fast peer's next iteration
                self.early[got] = self.early.get(got, 0) + 1

    def close(self) -> None:
        for sock in [self.inbox, *self.out.values()]:
            sock.close(linger=0)
        self.ctx.term()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def gloo_round_trip(rank: int, byte: torch.Tensor) -> None:
    if rank == 0:
        dist.send(byte, 1)
        dist.recv(byte, 1)
    else:
        dist.recv(byte, 0)
        dist.send(byte, 0)


def timed(fn, warmup: int, iters: int, cpu: list[float] | None = None) -> list[float]:
    """Barrier, warm up, then time `iters` calls of fn(i); their CPU times go to `cpu` if given."""
    dist.barrier()
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(warmup, warmup + iters):
        t0, cpu0 = time.perf_counter(), time.process_time()
        fn(i)
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - cpu0)
    return times


# -- the worker ------------------------------------------------------------------------------


def make_bus(transport: str, rank: int, world: int, store: dist.Store) -> Bus:
    names = [f"peer{r}" for r in range(world)]
    if transport == "torch-gloo":
        return TorchBus(rank=rank, world=world, names=names, device=torch.device("cpu"))
    ipc = transport == "zmq-ipc"
    run_id = hashlib.sha256(f"bench/{world}/{ipc}/{os.getppid()}".encode()).digest()[:8]
    return ZmqBus(
        rank=rank, world=world, names=names, run_id=run_id, config_hash="0" * 16,
        store=store, address="127.0.0.1", timeout_s=60.0, ipc=ipc,
    )  # fmt: skip


def worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: mp.Queue) -> None:
    own_session()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    store = dist.distributed_c10d._get_default_store()
    out: list[dict] = []
    for transport in args.transports:
        # floors on the transport itself
        if transport == "torch-gloo":
            byte = torch.zeros(1, dtype=torch.uint8)
            gather = [torch.zeros(1, dtype=torch.uint8) for _ in range(world)]

            def exch(i: int, byte=byte, gather=gather) -> None:
                dist.all_gather(gather, byte)

            def rtt(i: int, byte=byte) -> None:
                if rank < 2:
                    gloo_round_trip(rank, byte)

            raw = None
        else:
            raw = RawZmq(rank, world, store, f"{transport}-{os.getppid()}", transport == "zmq-ipc")
            exch = raw.exchange

            def rtt(i: int, raw=raw) -> None:
                if rank < 2:
                    raw.round_trip(1)

        floors = {
            "round_trip": timed(rtt, args.warmup, args.iters),
            "exchange_1b": timed(exch, args.warmup, args.iters),
        }
        multipart: dict[tuple[int, int], list[float]] = {}
        if raw is not None:
            for rows, cols in args.payloads:
                body = memoryview(bytes(rows * cols * 4))

                def exch_mp(i: int, raw=raw, body=body) -> None:
                    raw.exchange_multipart(i, body)

                multipart[rows, cols] = timed(exch_mp, args.warmup, args.iters)
            dist.barrier()  # everyone has everything: closing with linger=0 drops unsent frames
            raw.close()
        # the real bus
        bus = make_bus(transport, rank, world, store)
        step = 0
        for rows, cols in args.payloads:
            local = {rank: torch.log_softmax(torch.randn(rows, cols), dim=1)}

            def call(i: int, local=local, bus=bus) -> None:
                nonlocal step
                bus.exchange(StepKey(step, 0, FINGERPRINT), local, range(world))
                step += 1

            cpu: list[float] = []
            out.append(
                {
                    "transport": transport, "K": world, "rows": rows, "cols": cols,
                    "bus": timed(call, args.warmup, args.iters, cpu), "bus_cpu": cpu,
                    "round_trip": floors["round_trip"] if rank == 0 else [],
                    "exchange_1b": floors["exchange_1b"],
                    "multipart": multipart.get((rows, cols), []),
                }
            )  # fmt: skip
        dist.barrier()
        bus.close()
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cohort(world: int, args: argparse.Namespace) -> list[dict]:
    """Start `world` worker processes; pool their timings per cell."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, world, port, args, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    per_rank = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"exchange_latency: worker {p.name} exited with {p.exitcode}")
    cells = []
    for n, first in enumerate(per_rank[0][1]):
        pooled = {key: [] for key in ("bus", "bus_cpu", "round_trip", "exchange_1b", "multipart")}
        for _, out in per_rank:
            for key in pooled:
                pooled[key] += out[n][key]
        cells.append({**{k: first[k] for k in ("transport", "K", "rows", "cols")}, **pooled})
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--iters", type=int, default=1000, help="timed exchanges per cell")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", type=Path, help="also write the raw summaries here")
    args = parser.parse_args()
    args.transports, args.payloads = list(TRANSPORTS), list(PAYLOADS)
    if args.quick:
        args.iters, args.warmup, args.ks, args.payloads = 20, 5, [2], [PAYLOADS[0]]

    print(provenance_lines())
    print(f"machine: {machine()}")
    print(
        f"{args.iters} timed exchanges per cell after {args.warmup} warm-up, all ranks pooled; "
        f"load average before: {os.getloadavg()[0]:.2f}\n"
    )
    memcpy = {p: memcpy_floor(*p, args.iters) for p in args.payloads}
    records = []
    for world in args.ks:
        rows = []
        for cell in run_cohort(world, args):
            payload = (cell["rows"], cell["cols"])
            bus, cpu, rtt, ex = (
                summary_us(cell[k]) for k in ("bus", "bus_cpu", "round_trip", "exchange_1b")
            )
            mp_floor = summary_us(cell["multipart"]) if cell["multipart"] else None
            kib = cell["rows"] * cell["cols"] * 4 / 1024
            rows.append(
                [
                    cell["transport"], f"{cell['rows']} x {cell['cols']} ({kib:,.0f} KiB)",
                    bus["median_us"], bus["p99_us"], cpu["median_us"], cpu["mean_us"],
                    mp_floor["median_us"] if mp_floor else "n/a",
                    ex["median_us"], ex["p99_us"], rtt["median_us"], memcpy[payload]["median_us"],
                    f"{bus['median_us'] / ex['median_us']:.1f}x",
                ]
            )  # fmt: skip
            records.append(
                {"K": world, "transport": cell["transport"], "payload": payload, "bus": bus,
                 "bus_cpu": cpu, "raw_multipart": mp_floor, "exchange_1b": ex, "round_trip": rtt,
                 "memcpy": memcpy[payload]}
            )  # fmt: skip
        print(f"### K = {world}\n")
        header = [
            "transport", "payload B x C (float32)", "exchange median µs", "exchange p99 µs",
            "exchange CPU median µs", "exchange CPU mean µs",
            f"raw multipart ({HEADER.size} B header + payload) median µs",
            "1-byte exchange median µs", "1-byte exchange p99 µs", "1-byte round trip median µs",
            "memcpy median µs", "exchange / 1-byte exchange",
        ]  # fmt: skip
        print(markdown_table(header, rows) + "\n", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps({**provenance(), "machine": machine(), "cells": records}, indent=1)
        )


if __name__ == "__main__":
    main()
