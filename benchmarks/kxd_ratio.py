"""Step time of a K = 2 x D = 2 lockstep cohort over the same 4 processes training as 2
independent DDP peers, and the bytes each process and each peer exchange per step at D = 1, 2, 4.

Four processes, one thread each, the same data, the same small CNN, ranks peer-major (the
(peer, replica) mesh of dml_cluster.launch.topology). Conditions:
- independent DDP x 2: each peer a 1-peer cohort data-parallel over its 2 processes (DDP over the
  replica group; a LocalBus: no exchange);
- lockstep over zmq / torch (gloo): the 4 processes are the 2 x 2 cohort; replica r of each peer
  exchanges its half of the batch's predictions with the other peer's replica r.
Step time is one `CohortTrainer.train_step` (forward, exchange, loss, backward with the DDP
all-reduce, optimizer step). The conditions alternate in blocks of steps (order reversed every
block, a barrier before each), so load drift on a shared machine hits them alike and each
lockstep block has an independent block next to it: the paired block ratios' median and IQR are
the spread. Ratio = lockstep step time / independent step time.

Bytes: the zmq bus counters of replica 0 of peer 0 (`bytes_sent`, the train records of
runs/<name>/peers/<peer>.jsonl, differenced between steps) of short `dml-cluster train --nproc
K x D` runs at D = 1, 2, 4; per peer = per process x D.

Run from the repo root: .venv/bin/python benchmarks/kxd_ratio.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from statistics import median

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    machine,
    markdown_table,
    own_session,
    provenance,
    provenance_lines,
)

INDEPENDENT = "independent"
LABELS = {INDEPENDENT: "independent DDP peers x 2 (2 x 2 processes)"}
PEERS, REPLICAS = 2, 2


def base_config(args: argparse.Namespace, out_dir: Path, total_steps: int) -> dict:
    """The raw config of the 2 x 2 cohort; the independent condition makes it 1 peer."""
    data = {"name": "synthetic", "options": {
        "shape": [1, 28, 28], "train_size": args.batch_size * total_steps, "test_size": 256,
    }}  # fmt: skip
    return {
        "run": {"name": "kxd-ratio", "out_dir": str(out_dir), "log_every": 1, "threads": 1},
        "data": {**data, "batch_size": args.batch_size},
        "cohort": {
            "size": PEERS, "model": "small_cnn", "args": {"width": args.width},
            "replicas": REPLICAS,
        },
        "method": {"name": "dml"},
        "train": {"epochs": 1, "max_steps": total_steps},
        "bus": {"address": "127.0.0.1"},
        "metrics": {"enabled": False},
    }  # fmt: skip


def condition_config(raw: dict, condition: str) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["run"]["name"] = f"kxd-ratio-{condition}"
    if condition == INDEPENDENT:
        raw["cohort"]["size"] = 1
    else:
        raw["bus"]["transport"] = condition
    return raw


def worker(rank: int, port: int, args: argparse.Namespace, out_dir: str, queue: mp.Queue) -> None:
    from dml_cluster.bus.local import LocalBus
    from dml_cluster.config import parse_config
    from dml_cluster.data.sampler import fingerprint
    from dml_cluster.determinism import set_determinism
    from dml_cluster.launch.identity import run_id
    from dml_cluster.launch.topology import Topology, make_groups
    from dml_cluster.launch.transports import make_bus
    from dml_cluster.replicas import Replicas
    from dml_cluster.trainer import CohortTrainer, Placement

    own_session()
    topology = Topology(PEERS, REPLICAS)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=topology.world,
        timeout=timedelta(seconds=600),
    )  # fmt: skip
    groups = make_groups(topology, "cpu")
    peer, replica = topology.peer_of(rank), topology.replica_of(rank)
    replicas = Replicas(replica, REPLICAS, groups.replica)
    conditions = [INDEPENDENT, *args.transports]
    per_block = args.block_steps
    total = (args.blocks + 1) * per_block
    raw = base_config(args, Path(out_dir) / f"rank{rank}", total)
    cfgs = {c: parse_config(condition_config(raw, c)) for c in conditions}
    set_determinism(cfgs[INDEPENDENT])
    cpu = torch.device("cpu")
    trainers: dict[str, CohortTrainer] = {}
    for c, cfg in cfgs.items():
        if c == INDEPENDENT:  # peer `peer` alone, data-parallel over its 2 processes
            placement = Placement((0,), cpu, reporter=False, replicas=replicas)
            trainers[c] = CohortTrainer(cfg, LocalBus(), placement)
        else:
            bus = make_bus(cfg, peer, PEERS, run_id(cfg), cpu, replica, groups.exchange)
            placement = Placement((peer,), cpu, reporter=False, replicas=replicas)
            trainers[c] = CohortTrainer(cfg, bus, placement)
    first = trainers[INDEPENDENT]
    per_epoch = first.batches.num_train // args.batch_size
    epoch = list(first.batches.epoch(0, 0, per_epoch))  # this replica's half of each batch
    steps = dict.fromkeys(conditions, 0)
    records = []
    for block in range(args.blocks + 1):  # block 0 is the warm-up
        for c in conditions if block % 2 == 0 else conditions[::-1]:
            trainer = trainers[c]
            dist.barrier()
            for _ in range(per_block):
                _, idx, x, y = epoch[steps[c] % per_epoch]
                t0 = time.perf_counter()
                result = trainer.train_step(x, y, steps[c], fingerprint(idx))
                seconds = time.perf_counter() - t0
                if block > 0:
                    records.append((c, block, rank, seconds, result.times.exchange_seconds))
                steps[c] += 1
    dist.barrier()
    for trainer in trainers.values():
        trainer.bus.close()
        for log in trainer.peer_logs.values():
            log.close()
    queue.put(records)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_interleaved(args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    world = PEERS * REPLICAS
    with tempfile.TemporaryDirectory(prefix="kxd-ratio-") as tmp:
        port = free_port()
        procs = [
            ctx.Process(target=worker, args=(r, port, args, tmp, queue), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        records = [rec for _ in procs for rec in queue.get(timeout=3600)]
        for p in procs:
            p.join(60)
            if p.exitcode != 0:
                raise SystemExit(f"kxd_ratio: worker {p.name} exited with {p.exitcode}")
    return summarise(records, [INDEPENDENT, *args.transports], args.blocks)


def summarise(records: list[tuple], conditions: list[str], blocks: int) -> list[dict]:
    def rows(c: str, block: int | None = None) -> list[float]:
        return [r[3] for r in records if r[0] == c and (block is None or r[1] == block)]

    base = median(rows(INDEPENDENT))
    out = []
    for c in conditions:
        paired = [median(rows(c, b)) / median(rows(INDEPENDENT, b)) for b in range(1, blocks + 1)]
        q1, q2, q3 = (
            float(v) for v in torch.tensor(paired).quantile(torch.tensor([0.25, 0.5, 0.75]))
        )
        exchange = [r[4] for r in records if r[0] == c]
        out.append({
            "condition": c,
            "steps_per_process": len(rows(c)) // (PEERS * REPLICAS),
            "step_median_ms": 1e3 * median(rows(c)),
            "exchange_median_ms": 1e3 * median(exchange),
            "ratio_of_medians": median(rows(c)) / base,
            "paired_block_ratio_median": q2,
            "paired_block_ratio_iqr": (q1, q3),
        })  # fmt: skip
    return out


def bytes_per_step(args: argparse.Namespace, replicas: int, work: Path) -> dict:
    """One short `dml-cluster train --nproc 2 x D` run over zmq; its replica 0 of peer 0's
    bytes sent per step (steady state: differences between consecutive steps' counters)."""
    raw = base_config(args, work / "runs", args.byte_steps)
    raw["cohort"]["replicas"] = replicas
    raw["bus"]["transport"] = "zmq"
    raw["run"]["name"] = f"kxd-bytes-d{replicas}"
    path = work / f"d{replicas}.yaml"
    path.write_text(yaml.safe_dump(raw))
    nproc = PEERS * replicas
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "dml_cluster", "train", str(path), "--nproc", str(nproc)],
        cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"kxd_ratio: the D = {replicas} run failed:\n{done.stderr[-3000:]}")
    log = work / "runs" / raw["run"]["name"] / "peers" / "small_cnn-0.jsonl"
    sent = [
        r["bytes_sent"]
        for r in map(json.loads, log.read_text().splitlines())
        if r.get("event") == "train"
    ]
    per_step = sorted({b - a for a, b in zip(sent, sent[1:], strict=False)})
    return {
        "replicas": replicas,
        "processes": nproc,
        "rows_per_process": args.batch_size // replicas,
        "bytes_per_process_per_step": per_step,
        "bytes_per_peer_per_step": [b * replicas for b in per_step],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--blocks", type=int, default=16, help="measured blocks")
    parser.add_argument("--block-steps", type=int, default=20, help="steps a block")
    parser.add_argument("--batch-size", type=int, default=128, help="a peer's batch")
    parser.add_argument("--width", type=int, default=16, help="small_cnn width")
    parser.add_argument("--transports", nargs="+", default=["zmq", "torch"])
    parser.add_argument("--byte-steps", type=int, default=6, help="steps of each bytes run")
    parser.add_argument("--bytes-d", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.block_steps, args.byte_steps = 2, 2, 3
        args.batch_size, args.width, args.bytes_d = 32, 8, [1, 2]

    print(provenance_lines())
    print(f"machine: {machine()}")
    print(
        f"K = {PEERS} x D = {REPLICAS}; small_cnn width {args.width}, a peer's batch "
        f"{args.batch_size} ({args.batch_size // REPLICAS} per replica), synthetic 1x28x28; "
        f"{args.blocks} blocks x {args.block_steps} steps per condition after a warm-up block; "
        f"1 thread per process; load average before: {os.getloadavg()[0]:.2f}\n"
    )
    results = run_interleaved(args)
    header = [
        "condition", "steps per process", "step median ms", "exchange median ms",
        "ratio of medians", "paired block ratio, median [IQR]",
    ]  # fmt: skip
    rows = []
    for r in results:
        lo, hi = r["paired_block_ratio_iqr"]
        rows.append([
            LABELS.get(r["condition"], f"lockstep 2 x 2, {r['condition']}"),
            r["steps_per_process"], r["step_median_ms"], r["exchange_median_ms"],
            f"{r['ratio_of_medians']:.3f}",
            f"{r['paired_block_ratio_median']:.3f} [{lo:.3f}, {hi:.3f}]",
        ])  # fmt: skip
    print(markdown_table(header, rows))
    with tempfile.TemporaryDirectory(prefix="kxd-bytes-") as tmp:
        sizes = [bytes_per_step(args, d, Path(tmp)) for d in args.bytes_d]
    print()
    print(
        markdown_table(
            [
                "D",
                "processes",
                "rows per process",
                "bytes per process per step",
                "bytes per peer per step",
            ],
            [
                [
                    s["replicas"],
                    s["processes"],
                    s["rows_per_process"],
                    ", ".join(map(str, s["bytes_per_process_per_step"])),
                    ", ".join(map(str, s["bytes_per_peer_per_step"])),
                ]
                for s in sizes
            ],
        )  # fmt: skip
    )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        body = {**provenance(), "machine": machine(), "results": results, "bytes": sizes}
        args.json.write_text(json.dumps(body, indent=1))


if __name__ == "__main__":
    main()
