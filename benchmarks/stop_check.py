"""What the preemption check costs each step: every peer process, after every step, reads the
rendezvous store for the cohort's stop step (dml_cluster/preemption.py, `CohortStop.after`),
a TCPStore `check` of a key that is absent until a SIGTERM comes. Measured here against a store
served by another process over loopback, as torchrun's rank 0 serves it on one node (across
nodes add one network round trip). Run from the repo root:

    .venv/bin/python benchmarks/stop_check.py --repeats 5 --calls 2000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, provenance_lines  # noqa: E402

KEY = "dml-stop/benchmark"


def serve(port: int, ready: Any, done: Any) -> None:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, True, timedelta(seconds=60), wait_for_workers=False)
    ready.set()
    done.wait(120)
    del store  # served until here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="2 x 200 calls (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.calls = 2, 200
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    server = ctx.Process(target=serve, args=(port, ready, done))
    server.start()
    try:
        ready.wait(60)
        store = dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=60))
        per_call = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                store.check([KEY])
            per_call.append((time.perf_counter() - t0) / args.calls * 1e6)
    finally:
        done.set()
        server.join(30)
    print(provenance_lines())
    print(f"machine: {machine()}")
    runs = f"{args.repeats} x {args.calls} calls"
    print(f"| store.check per step, µs ({runs}) | median | min | max |")
    print("|---|---:|---:|---:|")
    median, low, high = statistics.median(per_call), min(per_call), max(per_call)
    print(f"| loopback TCPStore, another process | {median:.1f} | {low:.1f} | {high:.1f} |")


if __name__ == "__main__":
    main()
