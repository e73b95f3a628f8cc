"""Step time of a lockstep K = 2 cohort over 2 independent processes training the same model.

Two processes, one thread each, the same data, the same small CNN. Conditions:
- independent: each process trains its own 1-peer cohort (LocalBus: nothing leaves the process);
- independent, barrier each step (interleaved mode only): the same, but the two processes meet at
  a gloo barrier before every step and the step time includes the wait there (reported as its
  exchange). A cohort that synchronises each step but sends no predictions: its compute shows
  whether phase-aligned peers slow each other down, its wait what the synchronisation alone costs;
- lockstep over zmq / torch (gloo): the two processes are the two peers of a DML cohort.
Step time is what the trainer logs as `step_seconds`: one `CohortTrainer.train_step` (forward,
exchange, loss, backward, optimizer step). Ratio = lockstep step time / independent step time.
Also printed: 1 + exchange / compute, the same cost estimated inside one condition (the exchange
time includes waiting for the slower peer), which load drift between conditions cannot touch.
Interleaved mode also splits the exchange: the peer that reaches it second waits for nobody, so
its exchange time is the transfer itself (plus waking up); the rest is waiting for the slower peer.
A second table sets the measured overhead (step mean minus the independent step mean) next to the
straggler estimate E[max(c0, c1)] - E[(c0 + c1) / 2] from the per-step compute times c of the two
processes, paired step by step: what waiting for the slower of two peers costs given the jitter.

Two modes:
- interleaved (default): two worker processes build one real `CohortTrainer` per condition (the
  buses exactly as `launch.peer.run_peer` builds them) and alternate blocks of steps between the
  conditions (order reversed every block, a barrier before each block). Drift in the load of a
  shared machine then hits every condition alike, and each lockstep block has an independent
  block next to it: the per-block ratios are paired.
- cli: the end-to-end path a user runs, one condition after the other: two concurrent
  `dml-cluster train` runs of a 1-peer cohort vs one `dml-cluster train --nproc 2` run over the
  elastic launcher; step times read from runs/<name>/peers/<peer>.jsonl (run.log_every=1).
Every training process runs in a session of its own, as torchrun's workers do (see
bench_common.own_session: on a shared machine the kernel's autogroup scheduler would otherwise
give two processes of one session half the CPU share of two torchrun workers).

Run from the repo root: .venv/bin/python benchmarks/step_ratio.py [--quick] [--mode cli]
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
from statistics import mean, median

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

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
INDEPENDENT = "independent"
BARRIER = "barrier"
LABELS = {INDEPENDENT: "independent x 2", BARRIER: "independent x 2, barrier each step"}


def base_config(args: argparse.Namespace, out_dir: Path, total_steps: int) -> dict:
    """The raw config of the 2-peer cohort; the conditions override cohort.size / bus."""
    if args.data == "fashion-mnist":
        data = {"name": "fashion-mnist"}
    else:
        data = {"name": "synthetic", "options": {
            "shape": [1, 28, 28], "train_size": args.batch_size * total_steps, "test_size": 256,
        }}  # fmt: skip
    return {
        "run": {"name": "step-ratio", "out_dir": str(out_dir), "log_every": 1, "threads": 1},
        "data": {**data, "batch_size": args.batch_size},
        "cohort": {"size": 2, "model": "small_cnn", "args": {"width": args.width}},
        "method": {"name": "dml"},
        "train": {"epochs": 1, "max_steps": total_steps},
        "bus": {"address": "127.0.0.1"},
    }


def condition_config(raw: dict, condition: str) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["run"]["name"] = f"step-ratio-{condition}"
    if condition in (INDEPENDENT, BARRIER):
        raw["cohort"]["size"] = 1
    else:
        raw["bus"]["transport"] = condition
    return raw


# -- interleaved mode ------------------------------------------------------------------------


def interleaved_worker(
    rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str, queue: mp.Queue
) -> None:
    from dml_cluster.bus.local import LocalBus
    from dml_cluster.config import parse_config
    from dml_cluster.data.sampler import fingerprint
    from dml_cluster.determinism import set_determinism
    from dml_cluster.launch.identity import run_id
    from dml_cluster.launch.transports import make_bus
    from dml_cluster.trainer import CohortTrainer, Placement

    own_session()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=300),
    )  # fmt: skip
    conditions = [INDEPENDENT, BARRIER, *args.transports]
    per_block = args.block_steps
    total = (args.blocks + 1) * per_block
    raw = base_config(args, Path(out_dir) / f"rank{rank}", total)
    cfgs = {c: parse_config(condition_config(raw, c)) for c in conditions}
    set_determinism(cfgs[INDEPENDENT])
    cpu = torch.device("cpu")
    trainers: dict[str, CohortTrainer] = {}
    for c, cfg in cfgs.items():
        if c in (INDEPENDENT, BARRIER):
            trainers[c] = CohortTrainer(cfg, LocalBus(), Placement((0,), cpu, reporter=False))
        else:
            bus = make_bus(cfg, rank, world, run_id(cfg), cpu)
            trainers[c] = CohortTrainer(cfg, bus, Placement((rank,), cpu, reporter=False))
    first = trainers[INDEPENDENT]
    per_epoch = first.batches.num_train // args.batch_size
    epoch = list(first.batches.epoch(0, 0, per_epoch))  # (step, indices, x, y) on the device
    steps = dict.fromkeys(conditions, 0)
    records = []
    for block in range(args.blocks + 1):  # block 0 is the warm-up
        for c in conditions if block % 2 == 0 else conditions[::-1]:
            trainer = trainers[c]
            dist.barrier()
            for _ in range(per_block):
                _, idx, x, y = epoch[steps[c] % per_epoch]
                fp = fingerprint(idx)
                t0, cpu0 = time.perf_counter(), time.process_time()
                if c == BARRIER:
                    dist.barrier()
                waited = time.perf_counter() - t0
                result = trainer.train_step(x, y, steps[c], fp)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                exchange = waited if c == BARRIER else result.times.exchange_seconds
                if block > 0:
                    records.append((c, block, rank, seconds, exchange, cpu))
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
    with tempfile.TemporaryDirectory(prefix="step-ratio-") as tmp:
        port = free_port()
        procs = [
            ctx.Process(target=interleaved_worker, args=(r, 2, port, args, tmp, queue), daemon=True)
            for r in range(2)
        ]
        for p in procs:
            p.start()
        records = [rec for _ in procs for rec in queue.get(timeout=3600)]
        for p in procs:
            p.join(60)
            if p.exitcode != 0:
                raise SystemExit(f"step_ratio: worker {p.name} exited with {p.exitcode}")
    return summarise(records, [INDEPENDENT, BARRIER, *args.transports], args.blocks)


def summarise(records: list[tuple], conditions: list[str], blocks: int) -> list[dict]:
    def steps(c: str, block: int | None = None) -> list[tuple]:
        return [r for r in records if r[0] == c and (block is None or r[1] == block)]

    def block_mean(c: str, block: int) -> float:
        return mean(r[3] for r in steps(c, block))

    def later_peer_exchange(rows: list[tuple]) -> float:
        """Mean over steps of the smaller of the two peers' exchange times: the peer that came
        second to the exchange waited for nobody, so this is transfer plus wake-up."""
        by_rank = [[r for r in rows if r[2] == rank] for rank in (0, 1)]
        return mean(min(a[4], b[4]) for a, b in zip(*by_rank, strict=True))

    def straggler_estimate(rows: list[tuple]) -> float:
        """E[max(c0, c1)] - E[(c0 + c1) / 2] over steps, c = step - exchange of each process: the
        mean wait for the slower peer if the two had to meet after every step's compute."""
        by_rank = [[r[3] - r[4] for r in rows if r[2] == rank] for rank in (0, 1)]
        pairs = list(zip(*by_rank, strict=True))
        return mean(max(a, b) for a, b in pairs) - mean((a + b) / 2 for a, b in pairs)

    base = mean(r[3] for r in steps(INDEPENDENT))
    base_median = median(r[3] for r in steps(INDEPENDENT))
    out = []
    for c in conditions:
        rows = steps(c)
        paired = [block_mean(c, b) / block_mean(INDEPENDENT, b) for b in range(1, blocks + 1)]
        q1, q2, q3 = (
            float(v) for v in torch.tensor(paired).quantile(torch.tensor([0.25, 0.5, 0.75]))
        )
        out.append({
            "condition": c,
            "steps": len(rows),
            "step_mean_ms": 1e3 * mean(r[3] for r in rows),
            "step_median_ms": 1e3 * median(r[3] for r in rows),
            "exchange_mean_ms": 1e3 * mean(r[4] for r in rows),
            "cpu_mean_ms": 1e3 * mean(r[5] for r in rows),
            "later_peer_exchange_ms": 1e3 * later_peer_exchange(rows),
            "overhead_ms": 1e3 * (mean(r[3] for r in rows) - base),
            "straggler_estimate_ms": 1e3 * straggler_estimate(rows),
            "ratio_mean": mean(r[3] for r in rows) / base,
            "ratio_median": median(r[3] for r in rows) / base_median,
            "paired_ratio_median": q2,
            "paired_ratio_iqr": (q1, q3),
            # (block, rank, step s, exchange s (barrier wait for BARRIER), CPU s)
            "records": [r[1:] for r in rows],
        })  # fmt: skip
    return out


# -- cli mode --------------------------------------------------------------------------------


def step_times(log: Path, first: int, count: int) -> tuple[list[float], list[float]]:
    """step_seconds and exchange_seconds of steps [first, first + count) from a peer log."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("event") == "train" and first <= r["step"] < first + count]
    if len(rows) != count:
        raise SystemExit(f"step_ratio: {log} has {len(rows)} of the {count} steps asked for")
    return [r["step_seconds"] for r in rows], [r["exchange_seconds"] for r in rows]


def launch(cmds: list[list[str]]) -> None:
    """Run the commands at the same time from the repo root; fail loudly if any fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen(
            c,
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # as torchrun starts its workers: see own_session()
        )
        for c in cmds
    ]
    for cmd, proc in zip(cmds, procs, strict=True):
        output = proc.communicate()[0].decode(errors="replace")
        if proc.returncode != 0:
            raise SystemExit(f"step_ratio: {' '.join(cmd)} failed:\n{output[-3000:]}")


def cli_condition(condition: str, args: argparse.Namespace, work: Path, tag: str) -> dict:
    """One end-to-end measurement of `condition` through the `dml-cluster` command."""
    total = args.warmup + args.steps + 1
    raw = condition_config(base_config(args, work / "runs", total), condition)
    path = work / f"{condition}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cli = [sys.executable, "-m", "dml_cluster", "train", str(path)]
    if condition == INDEPENDENT:
        names = [f"indep-{tag}-a", f"indep-{tag}-b"]
        launch([[*cli, "--set", f"run.name={n}"] for n in names])
        logs = [work / "runs" / n / "peers" / "small_cnn-0.jsonl" for n in names]
    else:
        name = f"{condition}-{tag}"
        launch([[*cli, "--nproc", "2", "--set", f"run.name={name}"]])
        logs = [work / "runs" / name / "peers" / f"small_cnn-{i}.jsonl" for i in range(2)]
    times = [step_times(log, args.warmup, args.steps) for log in logs]
    step = [s for t in times for s in t[0]]
    return {
        "condition": condition,
        "steps": len(step),
        "step_mean_ms": 1e3 * mean(step),
        "step_median_ms": 1e3 * median(step),
        "exchange_mean_ms": 1e3 * mean(e for t in times for e in t[1]),
        "load": os.getloadavg()[0],
    }


def run_cli(args: argparse.Namespace) -> list[dict]:
    conditions = [INDEPENDENT, *args.transports]
    with tempfile.TemporaryDirectory(prefix="step-ratio-") as tmp:
        measured = {c: cli_condition(c, args, Path(tmp), "0") for c in conditions}
    base = measured[INDEPENDENT]
    for r in measured.values():
        r["ratio_mean"] = r["step_mean_ms"] / base["step_mean_ms"]
        r["ratio_median"] = r["step_median_ms"] / base["step_median_ms"]
    return list(measured.values())


# -- main ------------------------------------------------------------------------------------


def overhead_table(results: list[dict]) -> str:
    """The measured overhead of each condition next to the straggler estimate and the transfer."""
    header = [
        "condition", "overhead ms (step mean - independent step mean)",
        "straggler estimate ms, E[max(c0, c1)] - E[c] of this condition's compute",
        "exchange of the later peer ms (transfer + wake-up)",
    ]  # fmt: skip
    rows = [
        [
            LABELS.get(r["condition"], f"lockstep, {r['condition']}"), r["overhead_ms"],
            r["straggler_estimate_ms"], r["later_peer_exchange_ms"],
        ]
        for r in results
    ]  # fmt: skip
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--mode", choices=["interleaved", "cli"], default="interleaved")
    parser.add_argument("--blocks", type=int, default=25, help="interleaved: measured blocks")
    parser.add_argument("--block-steps", type=int, default=10, help="interleaved: steps a block")
    parser.add_argument("--steps", type=int, default=200, help="cli: measured steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="cli: steps skipped at the start")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=32, help="small_cnn width")
    parser.add_argument("--transports", nargs="+", default=["zmq", "torch"])
    default_data = "fashion-mnist" if FASHION_MNIST.is_dir() else "synthetic"
    parser.add_argument("--data", choices=["fashion-mnist", "synthetic"], default=default_data)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.block_steps, args.steps, args.warmup = 2, 2, 4, 1
        args.batch_size, args.width, args.data = 32, 8, "synthetic"

    print(provenance_lines())
    print(f"machine: {machine()}")
    print(
        f"mode {args.mode}; small_cnn width {args.width}, batch {args.batch_size}, {args.data}; "
        + (
            f"{args.blocks} blocks x {args.block_steps} steps per condition after a warm-up block"
            if args.mode == "interleaved"
            else f"{args.steps} steps after {args.warmup} warm-up"
        )
        + f"; 1 thread per process; load average before: {os.getloadavg()[0]:.2f}\n"
    )
    results = run_interleaved(args) if args.mode == "interleaved" else run_cli(args)
    header = [
        "condition", "steps (both processes)", "step mean ms", "step median ms",
        "exchange mean ms", "compute mean ms (step - exchange)", "ratio of means",
        "ratio of medians", "1 + exchange / compute",
    ]  # fmt: skip
    if args.mode == "interleaved":
        header += [
            "paired block ratio, median [IQR]", "CPU mean ms (all threads)",
            "exchange of the later peer ms (no waiting)",
        ]  # fmt: skip
    rows = []
    for r in results:
        name = LABELS.get(r["condition"], f"lockstep, {r['condition']}")
        row = [
            name, r["steps"], r["step_mean_ms"], r["step_median_ms"], r["exchange_mean_ms"],
            r["step_mean_ms"] - r["exchange_mean_ms"], f"{r['ratio_mean']:.3f}",
            f"{r['ratio_median']:.3f}",
            f"{r['step_mean_ms'] / (r['step_mean_ms'] - r['exchange_mean_ms']):.3f}",
        ]  # fmt: skip
        if args.mode == "interleaved":
            lo, hi = r["paired_ratio_iqr"]
            row.append(f"{r['paired_ratio_median']:.3f} [{lo:.3f}, {hi:.3f}]")
            row += [r["cpu_mean_ms"], r["later_peer_exchange_ms"]]
        rows.append(row)
    print(markdown_table(header, rows))
    if args.mode == "interleaved":
        print("\n" + overhead_table(results))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps({**provenance(), "machine": machine(), "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
