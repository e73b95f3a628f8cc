"""What a training step's bookkeeping costs with sparse rows on the wire, at a vocabulary's size
(issue 25): C = 32,000 classes, B x T = 4,096 token positions, K = 2 peers, one thread.

The bookkeeping is what the trainer does with the rows the bus delivered, besides the losses:
the step's event (`metrics.events.build_step_event`, batch statistics not asked for: a step
the run log and the exporter do not report) and the progress line's running cross-entropy
(`metrics.progress.RunningCrossEntropy.add`, every step). Two ways, each in a fresh process:

- `densify every step`: what the trainer did up to commit 2b57235 (`batch_log_ps =
  {j: readable(p) ...}` in `CohortTrainer.train_step`, then the dense rows in the event and in
  the cross-entropy): each peer's rows densified to [4,096, 32,000] float32 (524 MB) per step.
- `sparse`: what it does now: the event keeps the rows as delivered (densified only if read,
  on reporting steps), the cross-entropy reads each row's log-probability at its label from the
  sparse support (`sparse_rows.log_prob_at`).

Reported: the median over `--steps` steps of the bookkeeping's wall time, and the growth of the
process's peak RSS (the kernel's high-water mark) over the bookkeeping, beyond what it held
before it (the rows, made in chunks so no dense [4,096, 32,000] tensor precedes the
measurement). The rows are top-16, top-64 and sampled-12 (bf16 values) of peaked rows (logits
randn * 3, as benchmarks/wire_sparse.py makes them).

Run from the repo root: nice -n 10 .venv/bin/python benchmarks/sparse_bookkeeping.py [--quick]
(--quick: 1,000 classes x 256 rows, 2 steps: a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import machine, markdown_table, provenance, provenance_lines  # noqa: E402

from dml_cluster.bus.base import BusStats  # noqa: E402
from dml_cluster.metrics.events import build_step_event  # noqa: E402
from dml_cluster.metrics.progress import RunningCrossEntropy  # noqa: E402
from dml_cluster.sparse_rows import Rows, densify, encode_sampled, encode_topk  # noqa: E402
from dml_cluster.timing import KnownTimes  # noqa: E402

ENCODINGS = ("top-16", "top-64", "sampled-12")
WAYS = ("densify every step", "sparse")
CHUNK = 256


def make_rows(encoding: str, classes: int, rows: int, seed: int) -> Rows:
    """`encoding`'s rows of peaked log-probabilities, made `CHUNK` rows at a time."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for first in range(0, rows, CHUNK):
        log_p = (torch.randn(min(CHUNK, rows - first), classes, generator=g) * 3).log_softmax(1)
        if encoding.startswith("top-"):
            parts.append(encode_topk(log_p, int(encoding[4:])))
        else:  # the draws' rows are a function of the row index: key per chunk is enough here
            parts.append(encode_sampled(log_p, int(encoding[8:]), 1.0, seed * 1000 + first))
    fields = [f for f in vars(parts[0]) if f != "num_classes"]
    joined = {f: torch.cat([getattr(p, f) for p in parts]) for f in fields}
    return type(parts[0])(**joined, num_classes=classes)


def bookkeeping(way: str, received: dict[int, Rows], target: torch.Tensor, step: int,
                running: RunningCrossEntropy) -> None:  # fmt: skip
    """One non-reporting step's bookkeeping of the received rows, `way` (module docstring)."""
    log_ps = received if way == "sparse" else {j: densify(p) for j, p in received.items()}
    event = build_step_event(
        step=step, epoch=0, target=target, parts={}, log_ps=log_ps, lrs={0: 0.1},
        times=KnownTimes(0.0, {}, 0.0), bus=BusStats(), with_batch_stats=False,
    )  # fmt: skip
    running.add(event.received, event.target)


def child(way: str, encoding: str, classes: int, rows: int, steps: int) -> dict:
    """Measure in this (fresh) process."""
    received = {j: make_rows(encoding, classes, rows, j) for j in (0, 1)}
    target = torch.randint(classes, (rows,), generator=torch.Generator().manual_seed(7))
    running = RunningCrossEntropy()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(steps):
        started = time.perf_counter()
        bookkeeping(way, received, target, step, running)
        times.append(time.perf_counter() - started)
    ce = running.means()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "way": way, "encoding": encoding, "median_ms": 1e3 * statistics.median(times),
        "peak_rss_growth_mb": (peak - before) / 1024, "ce": ce[0],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, encoding, classes, rows, steps = args.child
        print(json.dumps(child(way, encoding, int(classes), int(rows), int(steps))))
        return
    classes, rows, steps = (1000, 256, 2) if args.quick else (32000, 4096, args.steps)
    print(provenance_lines())
    print(f"machine: {machine()}\nC = {classes:,}, rows = {rows:,}, K = 2, {steps} steps\n")
    results = []
    for encoding in ENCODINGS:
        for way in WAYS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", way, encoding, str(classes), str(rows),
                 str(steps)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = []
    for encoding in ENCODINGS:
        dense, sparse = (next(r for r in results if r["encoding"] == encoding and r["way"] == w)
                         for w in WAYS)  # fmt: skip
        assert dense["ce"] == sparse["ce"], (dense["ce"], sparse["ce"])  # the same figure
        for r in (dense, sparse):
            table.append([encoding, r["way"], r["median_ms"], r["peak_rss_growth_mb"]])
        table.append([encoding, "ratio (densify / sparse)",
                      f"{dense['median_ms'] / sparse['median_ms']:,.0f}x", "-"])  # fmt: skip
    print(markdown_table(["rows", "bookkeeping", "median ms/step", "peak RSS growth MB"], table))
    print("\nthe running cross-entropy is the same float either way (checked)")
    if args.json:
        args.json.write_text(json.dumps({**provenance(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
