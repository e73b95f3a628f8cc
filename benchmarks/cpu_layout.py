"""Why the accuracy benchmark's configs set `run.channels_last: true` and
`data.eval_batch_size: 128`: the training step and the test pass of `small_cnn` (width 32, the
students) and width 64 (the teacher) on Fashion-MNIST-sized inputs, one CPU thread, in NCHW and
NHWC layout, and the test pass at two batch sizes. Variants are measured in turns (A, B, A, B,
...) in one process, so the ratios share the machine's load. Run from the repo root:

    .venv/bin/python benchmarks/cpu_layout.py --repeats 5

A training step gets its batch in the model's layout (`CohortTrainer._input`). A test pass is
`evaluation.predict`, the function the trainer's evaluation calls, and it is timed with the
inputs each caller gives it: the trainer's evaluation passes the loader's test batches as they
come (NCHW) to a model whose weights are channels_last; `dml-cluster analyze` converts them
(`precision.to_layout`). Both are measured. For Fashion-MNIST's one channel they are the same
work: a one-channel batch is contiguous in both formats, so `to_layout` returns it with the same
strides and storage, and the two rows differ only by the machine's noise (a gauge of it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, provenance_lines  # noqa: E402

from dml_cluster.evaluation import predict  # noqa: E402
from dml_cluster.models import build_model  # noqa: E402
from dml_cluster.precision import to_layout, to_model_layout  # noqa: E402

SHAPE = (1, 28, 28)


def variant(width: int, nhwc: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return to_model_layout(build_model("small_cnn", SHAPE, 10, width=width), nhwc)


def batch(size: int, nhwc: bool) -> torch.Tensor:
    return to_layout(torch.randn(size, *SHAPE), nhwc)


def train_step(width: int, nhwc: bool) -> Callable[[], None]:
    model = variant(width, nhwc)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch(128, nhwc), torch.randint(0, 10, (128,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def test_pass(
    width: int, nhwc: bool, size: int, input_nhwc: bool, total: int = 2048
) -> Callable[[], None]:
    """`evaluation.predict` over `total` samples in batches of `size`: the model's weights in
    NHWC or not, the inputs in NHWC or not (the trainer's evaluation: NCHW inputs)."""
    model = variant(width, nhwc)
    x = batch(total, input_nhwc)

    def run() -> None:
        predict(model, x, size)

    return run


def timed(fn: Callable[[], None], calls: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 repeat, few calls (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    calls = 2 if args.quick else 10
    repeats = 1 if args.quick else args.repeats
    # name -> (fn, samples per call, the case it is compared with: NCHW of the same kind)
    cases: dict[str, tuple[Callable[[], None], int, str]] = {}
    callers: dict[str, str] = {}  # who runs a test pass that way
    for width in (32, 64):
        base = f"train step, width {width}, NCHW, batch 128"
        for nhwc in (False, True):
            name = f"train step, width {width}, {'NHWC' if nhwc else 'NCHW'}, batch 128"
            cases[name] = (train_step(width, nhwc), 128, base)
    baseline = "test pass, width 32, NCHW model, NCHW input, batch 1024"
    for nhwc, input_nhwc, who in (
        (False, False, "the default"),
        (True, False, "the trainer's evaluation of a channels_last run"),
        (True, True, "dml-cluster analyze of a channels_last run"),
    ):
        for size in (128, 1024):
            name = (
                f"test pass, width 32, {'NHWC' if nhwc else 'NCHW'} model, "
                f"{'NHWC' if input_nhwc else 'NCHW'} input, batch {size}"
            )
            cases[name] = (test_pass(32, nhwc, size, input_nhwc), 2048, baseline)
            callers[name] = who
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, _, _) in cases.items():
            seconds[name].append(timed(fn, calls))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(provenance_lines())
    print(f"machine: {machine()}; torch {torch.__version__}; 1 thread; {repeats} repeats")
    print("| case | who runs it | ms per call (median) | µs per sample | speed vs baseline |")
    print("|---|---|---:|---:|---:|")
    for name, (_, samples, base) in cases.items():
        m, who = median[name], callers.get(name, "training")
        speed = f"{median[base] / m:.2f}x"
        print(f"| {name} | {who} | {1e3 * m:.1f} | {1e6 * m / samples:.0f} | {speed} |")
    print(f"\nbaseline: the train step of the same width in NCHW; for test passes, {baseline}")


if __name__ == "__main__":
    main()
