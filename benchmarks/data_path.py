"""The data path: does reading the data or computing the step bound a peer, and is the data
streamed rather than held?

1. Loader throughput: samples/s of the data path's host side (`data.loader.read_batches`: the
   step's indices from (seed, epoch), items read and decoded, batches collated) with 0, 1, 2
   worker processes, on a generated ImageFolder of 32 x 32 PNGs (decoded with Pillow) and on an
   in-memory set (synthetic 3 x 32 x 32; one index operation per batch).
2. Step consumption: samples/s one peer's training step eats (forward, cross-entropy, backward,
   SGD step; one thread, as a peer process runs) for small_cnn and resnet20 on 3 x 32 x 32,
   batch 64. A peer is data-bound where the loader delivers fewer samples/s than its step eats.
3. Peak RSS of one peer process training on a generated ImageFolder whose decoded size
   (uint8 and float32) is several times the RSS growth: small PNGs scaled to `image_size` by the
   loader, so the decoded set is large while the files are small. The peak RSS (the kernel's
   high-water mark) of the peer's main process and of its loader workers is compared with the
   same run on a 20x smaller folder: the growth is what the data costs in memory.

Run from the repo root (niced, from a snapshot clone on a shared machine):
    nice -n 10 .venv/bin/python benchmarks/data_path.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from bench_common import machine, markdown_table, provenance, provenance_lines  # noqa: E402

from dml_cluster.data import load_dataset  # noqa: E402
from dml_cluster.data.loader import BatchReader, StepSampler, read_batches  # noqa: E402
from dml_cluster.models import build_model  # noqa: E402
from tests.imagefolder_helpers import write_imagefolder  # noqa: E402

BATCH = 64


def loader_rate(dataset, workers: int, steps: int, repeats: int) -> tuple[float, float, float]:
    """Medians over `repeats` epochs of `steps` batches of the train split: samples/s over the
    whole epoch (worker start included: the trainer makes a DataLoader per epoch), samples/s
    after the first batch (the steady rate), and seconds to the first batch."""
    reader = BatchReader(dataset.train, "train", dataset.name)
    whole, steady, first = [], [], []
    for r in range(repeats):
        sampler = StepSampler(len(reader), BATCH, 0, r, 0, steps)
        t0 = time.perf_counter()
        t1, n = 0.0, 0
        for i, batch in enumerate(read_batches(reader, sampler, workers, seed=(r,))):
            if i == 0:
                t1 = time.perf_counter()
            n += batch.x.shape[0]
        end = time.perf_counter()
        whole.append(n / (end - t0))
        steady.append((n - BATCH) / (end - t1))
        first.append(t1 - t0)
    return median(whole), median(steady), median(first)


def step_rate(model_name: str, steps: int, repeats: int) -> float:
    """Median samples/s of one peer's training step (forward, CE, backward, SGD)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_name, (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    rates = []
    for r in range(repeats + 1):  # the first repeat warms up
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if r:
            rates.append(steps * BATCH / (time.perf_counter() - t0))
    return median(rates)


def _high_water_mib(pid: int) -> float:
    """The kernel's peak resident set of a live process (VmHWM), in MiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024


def peak_rss(command: list[str]) -> tuple[float, float, float]:
    """Run `command`: the peak RSS (MiB, the kernel's high-water mark) of its main process, the
    largest peak RSS of its children (loader workers; pages shared with the main process
    included), and seconds. The high-water mark only grows, so polling it every 20 ms misses at
    most the last 20 ms of a process."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"main": 0.0, "worker": 0.0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            peaks["main"] = max(peaks["main"], _high_water_mib(proc.pid))
            try:
                children = root.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                peaks["worker"] = max(peaks["worker"], _high_water_mib(child.pid))
            time.sleep(0.02)

    t0 = time.perf_counter()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}): {err.decode()[-2000:]}")
    return peaks["main"], peaks["worker"], time.perf_counter() - t0


def rss_run(root: Path, out: Path, name: str, image_size: int, steps: int) -> list[str]:
    sets = [
        f"data.root={root}", f"data.image_size={image_size}", "data.workers=2",
        f"data.batch_size={BATCH}", "cohort.size=1", "cohort.model=small_cnn",
        "cohort.args.width=16", f"train.max_steps={steps}", "train.epochs=1000",
        "train.eval_every=1000",
        "metrics.enabled=false", "checkpoint.enabled=false", "run.progress_every_s=0",
        f"run.out_dir={out}", f"run.name={name}", "method.name=independent",
    ]  # fmt: skip
    args = [a for s in sets for a in ("--set", s)]
    return [sys.executable, "-m", "dml_cluster", "train", "configs/imagefolder-example.yaml", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    quick = args.quick
    steps, repeats = (4, 1) if quick else (30, 3)
    per_class = 40 if quick else 400  # x 10 classes of 32 x 32 PNGs
    big_per_class = 60 if quick else 1500  # x 4 classes of 24 x 24 PNGs, decoded at 112 x 112
    size = 48 if quick else 112
    small_per_class = max(BATCH // 4 + 1, big_per_class // 20)  # at least one batch
    results: dict = {**provenance(), "machine": machine(), "quick": quick}

    with tempfile.TemporaryDirectory(prefix="data-path-") as tmp_name:
        tmp = Path(tmp_name)
        folder = write_imagefolder(
            tmp / "images", per_class=per_class, val_per_class=4, size=(32, 32), classes=10
        )
        sets = {
            "imagefolder 32x32 PNG": load_dataset("imagefolder", str(folder)),
            "in-memory (synthetic 3x32x32)": load_dataset(
                "synthetic", shape=[3, 32, 32], train_size=per_class * 10
            ),
        }
        loader_rows, steady_rows = [], []
        results["loader"] = {}
        for label, dataset in sets.items():
            measured = {w: loader_rate(dataset, w, steps, repeats) for w in (0, 1, 2)}
            results["loader"][label] = {
                f"{w} workers": dict(zip(("epoch_samples_per_s", "steady_samples_per_s",
                                          "first_batch_s"), m, strict=True))
                for w, m in measured.items()
            }  # fmt: skip
            loader_rows.append([label, *(measured[w][0] for w in (0, 1, 2))])
            steady_rows.append(
                [label, *(measured[w][1] for w in (0, 1, 2)), *(measured[w][2] for w in (1, 2))]
            )
        step_rows = [
            [m, step_rate(m, max(2, steps // 3), repeats)] for m in ("small_cnn", "resnet20")
        ]
        results["step_samples_per_s"] = dict(step_rows)
        image_rate = steady_rows[0][1:4]
        bound_rows = [
            [m, rate, *["data" if r < rate else "compute" for r in image_rate]]
            for m, rate in step_rows
        ]

        small = write_imagefolder(tmp / "rss-small", per_class=small_per_class,
                                  val_per_class=4, size=(24, 24), seed=1)  # fmt: skip
        big = write_imagefolder(tmp / "rss-big", per_class=big_per_class, val_per_class=4,
                                size=(24, 24), seed=2)  # fmt: skip
        rss_steps = 8 if quick else 60
        rss = {}
        for name, root in (("small", small), ("big", big)):
            rss[name] = peak_rss(rss_run(root, tmp / "runs", name, size, rss_steps))
        n_big, n_small = 4 * big_per_class, 4 * small_per_class
        decoded = {n: count * 3 * size * size for n, count in (("big", n_big), ("small", n_small))}
        growth = rss["big"][0] - rss["small"][0]
        results["rss"] = {
            "image_size": size, "train_images": {"big": n_big, "small": n_small},
            "decoded_uint8_mib": {k: v / 2**20 for k, v in decoded.items()},
            "peak_main_mib": {k: v[0] for k, v in rss.items()},
            "peak_worker_mib": {k: v[1] for k, v in rss.items()},
            "seconds": {k: v[2] for k, v in rss.items()}, "growth_main_mib": growth,
            "growth_worker_mib": rss["big"][1] - rss["small"][1],
        }  # fmt: skip

    print(provenance_lines())
    print(f"machine: {results['machine']}\n")
    print(f"### Loader throughput, samples/s (batch {BATCH}, {steps} steps, median of {repeats})\n")
    print(markdown_table(["dataset", "0 workers", "1 worker", "2 workers"], loader_rows))
    print("\nSteady rate (after the first batch), samples/s, and seconds to the first batch:\n")
    header = ["dataset", "0 workers", "1 worker", "2 workers", "first batch s (1 w)",
              "first batch s (2 w)"]  # fmt: skip
    print(markdown_table(header, steady_rows))
    print(f"\n### One peer's training step, samples/s (3x32x32, batch {BATCH}, 1 thread)\n")
    header = ["model", "step samples/s", "bound at 0 workers (steady)", "1 worker", "2 workers"]
    print(markdown_table(header, bound_rows))
    r = results["rss"]
    print(f"\n### Peak RSS of a peer on a generated ImageFolder (decoded at {size}x{size})\n")
    rows = [
        [k, r["train_images"][k], r["decoded_uint8_mib"][k], 4 * r["decoded_uint8_mib"][k],
         r["peak_main_mib"][k], r["peak_worker_mib"][k], r["seconds"][k]]
        for k in ("small", "big")
    ]  # fmt: skip
    header = ["folder", "train images", "decoded uint8 MiB", "as float32 MiB",
              "peak RSS main MiB", "peak RSS of a worker MiB", "seconds"]  # fmt: skip
    print(markdown_table(header, rows))
    print(
        f"\nGrowth big - small: main {growth:.0f} MiB, a worker {r['growth_worker_mib']:.0f} MiB, "
        "for "
        f"{r['decoded_uint8_mib']['big'] - r['decoded_uint8_mib']['small']:.0f} MiB more decoded "
        "uint8 data"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
