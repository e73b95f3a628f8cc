"""What the sparse wire encodings cost in learning on a 100-class image task (issue 25).

The task: Fashion-MNIST pairs (benchmarks/fashion_pairs.py): two Fashion-MNIST images side by
side, label 10 * left + right, 100 classes; 20,000 train pairs from training images only,
5,000 test pairs from test images only, the pairing drawn once from a fixed seed.

The cohort: DML, K = 2 MLPs (1,568 -> 256 -> 128 -> 100; small_cnn's global average pool would
lose which item is left), batch 128, SGD (lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4,
cosine: the recipe of configs/fmnist3k-dml.yaml, not tuned here), `EPOCHS` epochs, evaluated on
the test pairs once, at the end. Nothing is tuned on the test set: the recipe, the budget, the
encodings and the seeds are fixed here before any run.

Rows: the wire dense float32 vs top-5, top-16 (bf16 values, uint8 ids), sampled-12, sampled-32
(n ids drawn at the receivers' temperature, 1 for DML); for context, the same students trained
alone (`independent`: what DML itself buys on this task; added after the encodings' runs), and
sampled-128, a probe added after them too (n beyond the bytes of dense at C = 100: does
sampled's cost fall as its variance, 1 / n, does?). Seeds 0, 1, 2 for every row: peer k of
seed s starts from the same weights and sees the same batches in every row (the paired design
of benchmarks/accuracy.py), so each row is compared with dense seed by seed. A run's figure is
the mean of its two students' final test accuracies (and test NLL, ECE: what soft labels act on
most, and where top-k's bias is said to show: calibration); the tables give its mean +- std
over seeds and the paired difference to dense with its 95% t-interval (n = 3, t = 4.303).

Bytes per step: what one peer sends per exchange on the zmq transport (its 56-byte header
included) for a batch of 128 rows at C = 100, from the encoding itself (the one-process engine
counts no bytes; the processes' bus sends exactly these messages, benchmarks/wire_sparse.py).

Every run is `python -m dml_cluster train CONFIG --set run.seed=S [--set bus....]` on the
one-process engine (the same numbers as one process per peer: tests/test_multiprocess.py),
niced, one thread, `--workers` at a time. Results are saved after every run into the JSON; a
re-run skips the runs already there.

Run from the repository root:
    nice -n 10 .venv/bin/python benchmarks/wire_classes100.py [--workers 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from bench_common import machine, markdown_table, provenance  # noqa: E402

from dml_cluster.bus.base import StepKey  # noqa: E402
from dml_cluster.bus.encoding import Encoding, payload_bytes  # noqa: E402
from dml_cluster.bus.wire import HEADER  # noqa: E402

EPOCHS = 10
SEEDS = (0, 1, 2)
BATCH = 128
CPU = torch.device("cpu")
T_975 = {2: 4.303}  # Student's t, 97.5% quantile, by degrees of freedom
ROWS: dict[str, tuple[tuple[str, ...], Encoding | None]] = {
    "dense float32": ((), Encoding("float32")),
    "top-5": (("bus.encoding=topk", "bus.k=5"), Encoding("topk", 5)),
    "top-16": (("bus.encoding=topk", "bus.k=16"), Encoding("topk", 16)),
    "sampled-12": (("bus.encoding=sampled", "bus.samples=12"), Encoding("sampled", samples=12)),
    "sampled-32": (("bus.encoding=sampled", "bus.samples=32"), Encoding("sampled", samples=32)),
    # context: what DML itself buys here (no mimicry term: the students learn alone)
    "independent": (("method.name=independent",), None),
    # a probe added after the first results: does sampled's cost fall with n (variance)?
    "sampled-128": (("bus.encoding=sampled", "bus.samples=128"), Encoding("sampled", samples=128)),
}
CONFIG = f"""\
# benchmarks/wire_classes100.py: DML, K = 2, on Fashion-MNIST pairs (100 classes)
run:
  name: pairs
data:
  name: python
  factory: "benchmarks.fashion_pairs:build"
  options: {{train_pairs: 20000, test_pairs: 5000}}
  normalize: {{mean: [0.2860], std: [0.3530]}}
  batch_size: {BATCH}
  eval_batch_size: 1000
cohort:
  size: 2
  model: mlp
method:
  name: dml
optim:
  lr: 0.05
  momentum: 0.9
  nesterov: true
  weight_decay: 5.0e-4
  schedule: {{name: cosine}}
train:
  epochs: {EPOCHS}
  eval_every: {EPOCHS}
"""


def bytes_per_step(encoding: Encoding) -> int:
    """One peer's message per exchange on zmq (header + payload) for BATCH rows at C = 100."""
    g = torch.Generator().manual_seed(0)
    log_p = (torch.randn(BATCH, 100, generator=g) * 3).log_softmax(dim=1)
    return HEADER.size + payload_bytes(encoding.send(log_p, StepKey(0, 0, 1), 0)).numel()


def read_run(folder: Path) -> dict:
    """A finished run's figures: each student's final test accuracy, NLL and ECE (from the
    last evaluation), the ensemble's, and what its encoding kept (peer 0's rows, mean over
    the logged steps)."""
    evals = [json.loads(line) for line in (folder / "cohort.jsonl").read_text().splitlines()]
    last = [r for r in evals if r.get("event") == "eval"][-1]
    peers = [last["peers"][p] for p in sorted(last["peers"])]
    log = (folder / "peers" / "mlp-0.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, log) if r.get("event") == "train"]

    def mean_of(key: str) -> float | None:  # over the logged steps (run.log_every)
        values = [r[key] for r in steps if key in r]
        return statistics.mean(values) if values else None

    return {
        "accuracy": [p["accuracy"] for p in peers], "nll": [p["nll"] for p in peers],
        "ece": [p["ece"] for p in peers], "entropy": [p["entropy"] for p in peers],
        "ensemble": last["ensemble"]["accuracy"], "ensemble_nll": last["ensemble"]["nll"],
        "kept_mass": mean_of("kept_mass"), "distinct_ids": mean_of("distinct_ids"),
    }  # fmt: skip


def evaluate_own(config: Path, folder: Path, seed: int) -> dict:
    """The final weights' own predictions on the test pairs, scored by the product's evaluation
    (`CohortTrainer.evaluate`) over the dense float32 wire: what the students learnt, apart
    from how the run's encoding would carry their predictions (a run's own evaluation scores
    them as they travelled: top-k's or sampled rows densified)."""
    from dml_cluster.bus.local import LocalBus
    from dml_cluster.config import load_config
    from dml_cluster.determinism import set_determinism
    from dml_cluster.launch.transports import bus_encoding
    from dml_cluster.trainer import CohortTrainer, Placement

    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(config, [f"run.seed={seed}", f"run.out_dir={scratch}",
                                   "metrics.enabled=false", "run.progress_every_s=0"])  # fmt: skip
        set_determinism(cfg)
        trainer = CohortTrainer(cfg, LocalBus(bus_encoding(cfg)), Placement((0, 1), CPU, True))
        for peer in trainer.peers.values():
            peer.model.load_state_dict(torch.load(folder / "final" / f"{peer.name}.pt"))
        report = trainer.evaluate(after_step=0)
        trainer.batches.close()
    peers = [report["peers"][p] for p in sorted(report["peers"])]
    return {
        "accuracy": [p["accuracy"] for p in peers], "nll": [p["nll"] for p in peers],
        "ece": [p["ece"] for p in peers], "entropy": [p["entropy"] for p in peers],
        "ensemble": report["ensemble"]["accuracy"], "ensemble_nll": report["ensemble"]["nll"],
    }  # fmt: skip


def run_one(config: Path, out: Path, row: str, seed: int) -> dict:
    """One training run and its figures (`read_run`)."""
    name = run_name(row, seed)
    sets = [f"run.seed={seed}", f"run.name={name}", f"run.out_dir={out}",
            "metrics.enabled=false", "run.progress_every_s=0", *ROWS[row][0]]  # fmt: skip
    cmd = [sys.executable, "-m", "dml_cluster", "train", str(config)]
    for s in sets:
        cmd += ["--set", s]
    started = time.perf_counter()
    done = subprocess.run(
        ["nice", "-n", "10", *cmd], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return {
        "row": row, "seed": seed, **read_run(out / name),
        "own": evaluate_own(config, out / name, seed),
        "wall_seconds": round(time.perf_counter() - started, 1), "commit": provenance()["commit"],
    }  # fmt: skip


def run_name(row: str, seed: int) -> str:
    return f"{row.replace(' ', '_')}-s{seed}"


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences."""
    m = statistics.mean(diffs)
    half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def paired(by: dict, row: str, figure: dict) -> list[str]:
    """`row`'s paired difference to dense on `figure` ((row, seed) -> value): mean, interval."""
    if row == "dense float32":
        return ["-", "-"]
    m, lo, hi = t_interval([figure[row, s] - figure["dense float32", s] for s in SEEDS])
    return [f"{m:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]"]


def tables(results: list[dict]) -> str:
    """Accuracy and bytes, then calibration: of the students' own predictions (`evaluate_own`),
    and the test NLL as the run's own evaluation scored them (as they travelled)."""
    by = {(r["row"], r["seed"]): r for r in results}
    complete = [row for row in ROWS if all((row, s) in by for s in SEEDS)]
    if "dense float32" not in complete:
        return "(dense float32 not run yet)"

    def figure(key: str, scale: float, own: bool = True) -> dict:
        return {k: scale * statistics.mean((r["own"] if own else r)[key]) for k, r in by.items()}

    acc, nll, ece = figure("accuracy", 100.0), figure("nll", 1.0), figure("ece", 100.0)
    entropy, travelled = figure("entropy", 1.0), figure("nll", 1.0, own=False)
    dense_bytes = bytes_per_step(ROWS["dense float32"][1])
    first, second = [], []
    for row in complete:
        encoding = ROWS[row][1]

        def spread(values: dict, digits: int, row: str = row) -> str:
            v = [values[row, s] for s in SEEDS]
            return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"

        def mean(key: str, row: str = row) -> float | None:
            values = [by[row, s][key] for s in SEEDS]
            return None if values[0] is None else statistics.mean(values)

        b = None if encoding is None else bytes_per_step(encoding)
        kept, distinct = mean("kept_mass"), mean("distinct_ids")
        ensemble = statistics.mean(100 * by[row, s]["own"]["ensemble"] for s in SEEDS)
        first.append([
            row, spread(acc, 2), *paired(by, row, acc), f"{ensemble:.2f}",
            "-" if b is None else f"{b:,}", "-" if b is None else f"{dense_bytes / b:.1f}x",
            "-" if kept is None else f"{kept:.3f}", "-" if distinct is None else f"{distinct:.1f}",
        ])  # fmt: skip
        second.append([
            row, spread(nll, 3), *paired(by, row, nll), spread(ece, 2), *paired(by, row, ece),
            spread(entropy, 3), spread(travelled, 3), *paired(by, row, travelled),
        ])  # fmt: skip
    header = ["wire", "accuracy % (mean ± std, 3 seeds)", "vs dense (pp)", "95% t-interval",
              "ensemble %", "bytes/step/peer (zmq)", "fewer bytes", "kept mass",
              "distinct ids/row"]  # fmt: skip
    header2 = ["wire", "test NLL", "vs dense", "95% t-interval", "ECE %", "vs dense (pp)",
               "95% t-interval", "entropy (nats)", "NLL as travelled", "vs dense",
               "95% t-interval"]  # fmt: skip
    return markdown_table(header, first) + "\n\n" + markdown_table(header2, second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "wire_classes100.json")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a tmp dir)")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--reread", action="store_true",
        help="re-read the figures of the stored runs from their folders under --out (no run)",
    )  # fmt: skip
    args = parser.parse_args()
    saved = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
    results: list[dict] = saved["runs"]
    if args.reread:
        for r in results:
            folder = args.out / run_name(r["row"], r["seed"])
            r.update(read_run(folder), own=evaluate_own(args.out / "pairs.yaml", folder, r["seed"]))
        args.json.write_text(json.dumps(saved, indent=1) + "\n")
    elif not args.render_only:
        out = args.out or Path(tempfile.mkdtemp(prefix="wire100-"))
        config = out / "pairs.yaml"
        out.mkdir(parents=True, exist_ok=True)
        config.write_text(CONFIG)
        done = {(r["row"], r["seed"]) for r in results}
        todo = [(row, s) for s in SEEDS for row in ROWS if (row, s) not in done]
        header = {**provenance(), "machine": machine(), "epochs": EPOCHS, "seeds": list(SEEDS)}

        def one(job: tuple[str, int]) -> None:
            r = run_one(config, out, *job)
            results.append(r)
            print(f"{r['row']} seed {r['seed']}: {r['accuracy']} ({r['wall_seconds']} s)",
                  flush=True)  # fmt: skip
            args.json.write_text(json.dumps({**header, "runs": results}, indent=1) + "\n")

        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(one, todo))
        saved = {**header, "runs": results}
    print(f"command: {saved.get('command')}\ncommit: {saved.get('commit')}")
    print(f"package: {saved.get('package')}\nmachine: {saved.get('machine')}\n")
    print(tables(results))


if __name__ == "__main__":
    main()
