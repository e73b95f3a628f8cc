"""The GPU check: one prepared command that measures the project's GPU figures.

    python benchmarks/gpu_check.py --out gpu_check_out         # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --only layouts               # rerun one section
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc      # anywhere: CPU, gloo, tiny sizes

Sections, cheapest first; each writes `<out>/<section>.md` and `.json` as soon as it completes, so
a run cut short still returns what it measured, and a short table (`summary.md`) ends the run:

- syncs (e): host synchronisations per non-reporting training step of the one-process engine
  (K = 2), counted with `torch.cuda.set_sync_debug_mode("warn")`, with the Python lines that
  caused them. Target: none (the local bus has no transport wait).
- overhead (a): samples/s of a one-peer cohort (`dml-cluster`'s one-process run) vs a plain
  PyTorch loop of the same model, batch, precision and determinism mode: ResNet-20 on 3x32x32,
  ResNet-18 on 3x64x64, fp32 and bf16. Target: ratio >= 0.95.
- determinism (d): the one-peer cohort under run.deterministic strict vs off (cuDNN autotuning):
  the cost of reproducibility.
- layouts (b, f): K = 2 peers on the machine's GPU(s) under run.deterministic strict, as the
  one-process engine and as two processes (`--nproc 2`, torch transport and zmq): step time of
  each layout, exchange time, and the largest |w - w_engine| over every weight after the steps
  (0 = bitwise: the oracle on a GPU).
- speedups (c): the one-peer ResNet-18 cohort with bf16, channels_last, bf16 + channels_last and
  torch.compile, each against fp32 eager.

Every timed cohort is the real one-process run (`dml_cluster.launch.run_local`) or the real
`python -m dml_cluster train` (layouts). Throughput is timed over the steps after a warm-up,
the device synchronised at the two ends only, so neither side pays a sync per step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import commit, machine, markdown_table  # noqa: E402

from dml_cluster.config import parse_config  # noqa: E402
from dml_cluster.determinism import prepare_environment  # noqa: E402
from dml_cluster.devices import process_group_backend  # noqa: E402
from dml_cluster.launch import run_local  # noqa: E402
from dml_cluster.metrics.events import EvalEvent, StepEvent  # noqa: E402
from dml_cluster.models import build_model  # noqa: E402
from dml_cluster.precision import autocast  # noqa: E402

SECTIONS = ("syncs", "overhead", "determinism", "layouts", "speedups")
PAIR = [{"name": "cnn", "model": "small_cnn"}, {"name": "resnet20", "model": "resnet20"}]
SYNC_MESSAGE = "synchroniz"  # torch's sync debug warning: "called a synchronizing CUDA operation"


@dataclass(frozen=True)
class Sizes:
    """How big the check runs: the GPU sizes, or tiny ones for --dry-run."""

    small: tuple[int, int, int]  # the small model's input
    large: tuple[int, int, int]  # the large model's input
    small_model: str
    large_model: str
    batch_size: int
    steps: int  # timed cohorts: steps in all
    warmup: int  # left out of the timings (cuDNN autotuning, compile, first allocations)
    layout_steps: int  # the layouts' runs (and the parity after them)
    timeout_s: float

    @classmethod
    def pick(cls, dry_run: bool) -> Sizes:
        if dry_run:
            return cls((3, 8, 8), (3, 8, 8), "small_cnn", "small_cnn", 8, 6, 2, 6, 300)
        return cls((3, 32, 32), (3, 64, 64), "resnet20", "resnet18", 128, 80, 20, 50, 300)

    def train_size(self, steps: int) -> int:
        return self.batch_size * steps  # one epoch holds every step


def cohort_config(
    sizes: Sizes,
    out: Path,
    name: str,
    peers: list[dict[str, Any]],
    shape: tuple[int, int, int],
    steps: int,
    **run: Any,
) -> dict[str, Any]:
    """A synthetic-data cohort of `peers` trained `steps` steps in one epoch; `run`: run.* keys."""
    return {
        "run": {
            "name": name,
            "out_dir": str(out),
            "seed": 0,
            "log_every": 10**6,
            "progress_every_s": 0,
            **run,
        },
        "data": {
            "name": "synthetic",
            "options": {
                "shape": list(shape),
                "train_size": sizes.train_size(steps),
                "test_size": sizes.batch_size,
            },
            "batch_size": sizes.batch_size,
        },
        "cohort": {"peers": peers},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1},
        "metrics": {"enabled": False},
        "checkpoint": {"enabled": False},
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- observers of the real one-process run ---------------------------------------------------


class StepClock:
    """Reads the wall clock after steps `first` and `last`, synchronising the device there only:
    the steps between them are timed whole, with no sync of their own added."""

    def __init__(self, first: int, last: int, device: torch.device) -> None:
        self.first, self.last, self.device = first, last, device
        self.marks: dict[int, float] = {}

    def wants_batch_stats(self, step: int) -> bool:
        return False

    def on_step(self, event: StepEvent) -> None:
        if event.step in (self.first, self.last):
            sync(self.device)
            self.marks[event.step] = time.perf_counter()

    def on_eval(self, event: EvalEvent) -> None:
        pass

    def on_end(self, summary: dict[str, Any]) -> None:
        pass

    def seconds_per_step(self) -> float:
        return (self.marks[self.last] - self.marks[self.first]) / (self.last - self.first)


class SyncCounter:
    """Counts the host synchronisations torch reports between consecutive steps."""

    def __init__(self, caught: list[warnings.WarningMessage]) -> None:
        self.caught = caught
        self.at_step: dict[int, int] = {}

    def wants_batch_stats(self, step: int) -> bool:
        return False

    def on_step(self, event: StepEvent) -> None:
        self.at_step[event.step] = len(self.caught)

    def on_eval(self, event: EvalEvent) -> None:
        pass

    def on_end(self, summary: dict[str, Any]) -> None:
        pass


def run_cohort(raw: dict[str, Any], observers: list[Any]) -> dict[str, Any]:
    """The real one-process run, its per-class tables kept off this script's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        return run_local(parse_config(raw), observers)


def timed_cohort(
    sizes: Sizes,
    work: Path,
    name: str,
    model: str,
    shape: tuple[int, int, int],
    device: torch.device,
    **run: Any,
) -> float:
    """Samples/s of a one-peer cohort of `model`."""
    raw = cohort_config(
        sizes, work, name, [{"name": "peer", "model": model}], shape, sizes.steps, **run
    )
    clock = StepClock(sizes.warmup - 1, sizes.steps - 1, device)
    run_cohort(raw, [clock])
    return sizes.batch_size / clock.seconds_per_step()


def plain_loop(
    sizes: Sizes,
    model_name: str,
    shape: tuple[int, int, int],
    device: torch.device,
    precision: str,
) -> float:
    """Samples/s of a hand-written loop of one model (the ceiling): the same synthetic batch
    size and optimizer, batches copied from pinned host memory, no exchange, no logging, and the
    process's determinism mode as the cohort before it left it."""
    torch.manual_seed(0)
    n = sizes.batch_size * 8
    x_all = torch.randn(n, *shape)
    y_all = torch.randint(0, 10, (n,))
    if device.type == "cuda":
        x_all, y_all = x_all.pin_memory(), y_all.pin_memory()
    model = build_model(model_name, shape, 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    bs, t_first = sizes.batch_size, 0.0
    for step in range(sizes.steps):
        i = (step * bs) % n
        x = x_all[i : i + bs].to(device, non_blocking=True)
        y = y_all[i : i + bs].to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == sizes.warmup - 1:
            sync(device)
            t_first = time.perf_counter()
    sync(device)
    per_step = (time.perf_counter() - t_first) / (sizes.steps - sizes.warmup)
    return bs / per_step


# -- the sections ----------------------------------------------------------------------------


def section_syncs(ctx: Context) -> dict[str, Any]:
    """(e) Host syncs per non-reporting step of the K = 2 one-process engine."""
    sizes, device = ctx.sizes, ctx.device
    raw = cohort_config(sizes, ctx.work, "syncs", PAIR, sizes.small, sizes.steps)
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        counter = SyncCounter(recorded)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            run_cohort(raw, [counter])
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in recorded if SYNC_MESSAGE in str(w.message)]
    marks = counter.at_step
    # steps after the warm-up up to the last: none of them reports (log_every is 10^6)
    steps = range(sizes.warmup, sizes.steps)
    per_step = []
    sites: dict[str, int] = {}
    for s in steps:
        lo, hi = marks[s - 1], marks[s]
        step_syncs = [w for w in recorded[lo:hi] if SYNC_MESSAGE in str(w.message)]
        per_step.append(len(step_syncs))
        for w in step_syncs:
            site = f"{_short(w.filename)}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return {
        "counted": device.type == "cuda",
        "steps": len(per_step),
        "syncs_per_step": statistics.mean(per_step) if per_step else 0.0,
        "max_per_step": max(per_step, default=0),
        "total_in_run": len(syncs),
        "sites": dict(sorted(sites.items(), key=lambda kv: -kv[1])),
    }


def _short(filename: str) -> str:
    path = Path(filename)
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        parts = path.parts
        return "/".join(parts[parts.index("torch") :]) if "torch" in parts else path.name


def section_overhead(ctx: Context) -> dict[str, Any]:
    """(a) One-peer cohort vs a plain loop: samples/s, same model, batch, precision."""
    sizes, device, rows = ctx.sizes, ctx.device, []
    pairs = ((sizes.small_model, sizes.small), (sizes.large_model, sizes.large))
    for size, (model, shape) in zip(("small", "large"), pairs, strict=True):
        for precision in ("fp32", "bf16"):
            # a run folder each (the dry run's two sizes are the same model: a second run of one
            # folder would be a finished run, which trains nothing)
            name = f"overhead-{size}-{model}-{precision}"
            cohort = timed_cohort(sizes, ctx.work, name, model, shape, device, precision=precision)
            plain = plain_loop(sizes, model, shape, device, precision)
            rows.append(
                {
                    "model": model,
                    "input": "x".join(map(str, shape)),
                    "precision": precision,
                    "plain_samples_per_s": plain,
                    "cohort_samples_per_s": cohort,
                    "ratio": cohort / plain,
                }
            )
    return {"rows": rows, "target": 0.95, "determinism": "strict (the default)"}


def section_determinism(ctx: Context) -> dict[str, Any]:
    """(d) run.deterministic strict vs off on the one-peer ResNet-18 cohort."""
    sizes, device, rows = ctx.sizes, ctx.device, []
    for precision in ("fp32", "bf16"):
        speed = {}
        for mode in ("strict", "off"):
            name = f"det-{mode}-{precision}"
            speed[mode] = timed_cohort(
                sizes,
                ctx.work,
                name,
                sizes.large_model,
                sizes.large,
                device,
                precision=precision,
                deterministic=mode,
            )
        rows.append(
            {
                "precision": precision,
                "strict_samples_per_s": speed["strict"],
                "off_samples_per_s": speed["off"],
                "strict_cost": 1 - speed["strict"] / speed["off"],
            }
        )
    return {"model": sizes.large_model, "input": "x".join(map(str, sizes.large)), "rows": rows}


def section_speedups(ctx: Context) -> dict[str, Any]:
    """(c) bf16, channels_last, both, compile: each against fp32 eager (ResNet-18)."""
    sizes, device = ctx.sizes, ctx.device
    variants: list[tuple[str, dict[str, Any]]] = [
        ("fp32 eager", {}),
        ("bf16", {"precision": "bf16"}),
        ("channels_last", {"channels_last": True}),
        ("bf16 + channels_last", {"precision": "bf16", "channels_last": True}),
    ]
    if ctx.compile:  # last: compiling takes the longest
        variants.append(("compile (fp32)", {"compile": True}))
    rows, base = [], None
    for label, run in variants:
        # compile recompiles after the first steps; it gets a longer warm-up
        s = Sizes(**{**asdict(ctx.sizes), "steps": sizes.steps + 20, "warmup": sizes.warmup + 20})
        s = s if "compile" in run else sizes
        name = "speed-" + label.replace(" ", "").replace("+", "-").replace("(", "").replace(")", "")
        speed = timed_cohort(
            s, ctx.work, name, sizes.large_model, sizes.large, device, deterministic="off", **run
        )
        base = base or speed
        rows.append({"variant": label, "samples_per_s": speed, "speedup": speed / base})
        ctx.partial(rows)  # compile may take long: what is measured so far is kept
    return {
        "model": sizes.large_model,
        "input": "x".join(map(str, sizes.large)),
        "determinism": "off",
        "rows": rows,
        "compile_measured": ctx.compile,
    }


def section_layouts(ctx: Context) -> dict[str, Any]:
    """(b, f) K = 2 as one process and as two processes; step times and the weights' parity."""
    sizes, work, transports = ctx.sizes, ctx.work, ctx.transports
    runs = {}
    for transport in ("local", *transports):
        raw = cohort_config(
            sizes,
            work / "runs",
            f"layout-{transport}",
            PAIR,
            sizes.small,
            sizes.layout_steps,
            deterministic="strict",
            log_every=1,
        )
        runs[transport] = train_cli(raw, work, sizes.timeout_s, transport)
    engine = runs["local"].weights()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = process_group_backend(parse_config(raw), len(PAIR), gpus=gpus)
    rows = []
    for transport, run in runs.items():
        steps = [r for p in PAIR for r in run.records(p["name"]) if r["event"] == "train"]
        timed = [r for r in steps if r["step"] >= sizes.warmup] or steps
        rows.append(
            {
                "layout": "one process" if transport == "local" else f"2 processes ({transport})",
                "messages_over": {"local": "(in memory)", "torch": backend, "zmq": "zmq sockets"}[
                    transport
                ],
                "median_step_s": statistics.median(r["step_seconds"] for r in timed),
                "median_exchange_s": statistics.median(r["exchange_seconds"] for r in timed),
                "max_abs_weight_diff": 0.0
                if transport == "local"
                else max_diff(engine, run.weights()),
                "wall_s": round(run.seconds, 1),
            }
        )
    one = rows[0]["median_step_s"]
    for row in rows:
        row["step_time_vs_one_process"] = row["median_step_s"] / one
    note = ""
    if gpus == 1:
        note = (
            "one GPU: both processes share it, so the torch transport runs over gloo with "
            "host staging; NCCL between processes and peers on different GPUs need >= 2 GPUs "
            "and were not run"
        )
    elif gpus == 0:
        note = "no GPU (dry run): every layout on the CPU, the torch transport over gloo"
    return {
        "rows": rows,
        "steps": sizes.layout_steps,
        "deterministic": "strict",
        "note": note,
        "backend": backend,
        "gpus": gpus,
    }


@dataclass
class Run:
    """One `dml-cluster train` and what it left."""

    name: str
    run_dir: Path
    seconds: float

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            p.stem: torch.load(p, weights_only=True, map_location="cpu")
            for p in sorted((self.run_dir / "final").glob("*.pt"))
        }

    def records(self, peer: str) -> list[dict[str, Any]]:
        path = self.run_dir / "peers" / f"{peer}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def train_cli(raw: dict[str, Any], work: Path, timeout_s: float, transport: str) -> Run:
    """`python -m dml_cluster train` on `raw`: one process (transport local) or `--nproc 2`."""
    name = raw["run"]["name"]
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "dml_cluster", "train", str(path)]
    if transport != "local":
        command += [
            "--nproc",
            str(len(raw["cohort"]["peers"])),
            "--set",
            f"bus.transport={transport}",
        ]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"run {name} took over {timeout_s:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"run {name} failed (exit {done.returncode}):\n{tail}")
    return Run(name, Path(raw["run"]["out_dir"]) / name, time.perf_counter() - start)


def max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for peer in a:
        for key in a[peer]:
            diff = (a[peer][key].double() - b[peer][key].double()).abs().max().item()
            worst = max(worst, diff)
    return worst


# -- reports ---------------------------------------------------------------------------------


def md_syncs(r: dict[str, Any]) -> str:
    if not r["counted"]:
        return "No CUDA device: host syncs are counted on a GPU only (the path ran)."
    sites = [[site, n] for site, n in list(r["sites"].items())[:12]]
    return "\n".join(
        [
            f"Host syncs per non-reporting step (K = 2, one process, {r['steps']} steps): "
            f"**{r['syncs_per_step']:.2f}** (max {r['max_per_step']}); "
            f"whole run {r['total_in_run']}.",
            "",
            markdown_table(["where (file:line)", "syncs in the counted steps"], sites)
            if sites
            else "No sync site in the counted steps.",
        ]
    )


def md_overhead(r: dict[str, Any]) -> str:
    rows = [
        [
            x["model"],
            x["input"],
            x["precision"],
            float(x["plain_samples_per_s"]),
            float(x["cohort_samples_per_s"]),
            f"{x['ratio']:.3f}",
        ]
        for x in r["rows"]
    ]
    return markdown_table(
        [
            "model",
            "input",
            "precision",
            "plain loop samples/s",
            "cohort peer samples/s",
            "ratio (target >= 0.95)",
        ],
        rows,
    )


def md_determinism(r: dict[str, Any]) -> str:
    rows = [
        [
            x["precision"],
            float(x["strict_samples_per_s"]),
            float(x["off_samples_per_s"]),
            f"{100 * x['strict_cost']:.1f}%",
        ]
        for x in r["rows"]
    ]
    return f"{r['model']} on {r['input']}, one peer:\n\n" + markdown_table(
        ["precision", "strict samples/s", "off samples/s", "cost of strict"], rows
    )


def md_layouts(r: dict[str, Any]) -> str:
    rows = [
        [
            x["layout"],
            x["messages_over"],
            f"{1000 * x['median_step_s']:.2f}",
            f"{1000 * x['median_exchange_s']:.3f}",
            f"{x['step_time_vs_one_process']:.2f}",
            f"{x['max_abs_weight_diff']:.3g}",
            x["wall_s"],
        ]
        for x in r["rows"]
    ]
    table = markdown_table(
        [
            "layout",
            "messages over",
            "median step ms",
            "median exchange ms",
            "step time / one process",
            f"max abs weight diff after {r['steps']} steps",
            "wall s",
        ],
        rows,
    )
    return table + (f"\n\nNote: {r['note']}" if r["note"] else "")


def md_speedups(r: dict[str, Any]) -> str:
    rows = [[x["variant"], float(x["samples_per_s"]), f"{x['speedup']:.2f}"] for x in r["rows"]]
    text = f"{r['model']} on {r['input']}, one peer, run.deterministic off:\n\n" + markdown_table(
        ["variant", "samples/s", "speed-up over fp32 eager"], rows
    )
    if not r.get("compile_measured", True):
        text += "\n\ncompile not measured (--compile off, or a dry run)."
    return text


# -- the driver ------------------------------------------------------------------------------


@dataclass
class Context:
    sizes: Sizes
    device: torch.device
    work: Path
    out: Path
    transports: tuple[str, ...]
    compile: bool
    section: str = ""

    def partial(self, rows: list[dict[str, Any]]) -> None:
        """Keep what a long section measured so far (`<section>.partial.json`)."""
        path = self.out / f"{self.section}.partial.json"
        path.write_text(json.dumps(rows, indent=2))


RUNNERS: dict[
    str, tuple[Callable[[Context], dict[str, Any]], Callable[[dict[str, Any]], str], str]
] = {
    "syncs": (section_syncs, md_syncs, "(e) host syncs per step"),
    "overhead": (section_overhead, md_overhead, "(a) cohort peer vs plain PyTorch loop"),
    "determinism": (section_determinism, md_determinism, "(d) strict vs off determinism"),
    "layouts": (
        section_layouts,
        md_layouts,
        "(b, f) K = 2: one process vs two processes, and their weights",
    ),
    "speedups": (section_speedups, md_speedups, "(c) bf16 / channels_last / compile"),
}


def summary_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    if r := results.get("syncs"):
        value = f"{r['syncs_per_step']:.2f}" if r["counted"] else "n/a (CPU)"
        rows.append(["host syncs per non-reporting step (one process, K = 2)", value, "0"])
    if r := results.get("overhead"):
        worst = min(r["rows"], key=lambda x: x["ratio"])
        rows.append(
            [
                "cohort peer / plain loop samples/s (worst case)",
                f"{worst['ratio']:.3f} ({worst['model']} {worst['precision']})",
                ">= 0.95",
            ]
        )
    if r := results.get("determinism"):
        costs = ", ".join(f"{x['precision']} {100 * x['strict_cost']:.1f}%" for x in r["rows"])
        rows.append(["cost of run.deterministic strict vs off", costs, "(measured)"])
    if r := results.get("layouts"):
        for x in r["rows"][1:]:
            rows.append(
                [
                    f"{x['layout']}: step time / one process",
                    f"{x['step_time_vs_one_process']:.2f}",
                    "(measured)",
                ]
            )
            rows.append(
                [
                    f"{x['layout']}: max abs weight diff vs one process",
                    f"{x['max_abs_weight_diff']:.3g}",
                    "0",
                ]
            )
    if r := results.get("speedups"):
        for x in r["rows"][1:]:
            rows.append([f"speed-up of {x['variant']}", f"{x['speedup']:.2f}", "(measured)"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU devices, gloo, tiny sizes")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("gpu_check_out"),
        help="folder for each section's .md and .json (default gpu_check_out)",
    )
    parser.add_argument("--only", help=f"comma-separated sections to run: {', '.join(SECTIONS)}")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile in speedups: auto = on a GPU, off in a dry run",
    )
    parser.add_argument(
        "--transports",
        default="torch,zmq",
        help="the two-process layouts to run: torch, zmq or both (default)",
    )
    parser.add_argument("--commit", help="the commit measured, where the checkout has no .git")
    args = parser.parse_args(argv)
    transports = tuple(t for t in args.transports.split(",") if t)
    if not transports or set(transports) - {"torch", "zmq"}:
        parser.error("--transports: a comma-separated list of torch and zmq")
    only = tuple(s for s in (args.only or ",".join(SECTIONS)).split(",") if s)
    if set(only) - set(SECTIONS):
        parser.error(f"--only: sections are {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA GPU visible (torch {torch.__version__}); run with --dry-run "
            "to exercise the CPU path",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU devices and gloo, whatever the machine has
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the in-process runs share this process's CUDA: cuBLAS's fixed workspace (strict and warn
    # need it) must be in the environment before CUDA starts, as `dml-cluster train` does
    prepare_environment("strict")
    device = torch.device("cpu" if args.dry_run else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    head = {
        "dry_run": args.dry_run,
        "machine": machine(),
        "devices": "cpu"
        if args.dry_run
        else ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": args.commit or commit(),
        "command": " ".join(["python", *sys.argv]),
    }
    (args.out / "machine.json").write_text(json.dumps(head, indent=2))
    print(f"## GPU check{' (dry run: CPU, gloo, tiny sizes)' if args.dry_run else ''}\n")
    for key in ("machine", "devices", "commit", "command"):
        print(f"{key}: {head[key]}")
    compile_models = args.compile == "on" or (args.compile == "auto" and not args.dry_run)
    results: dict[str, dict[str, Any]] = {}
    failed = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(
            Sizes.pick(args.dry_run), device, Path(tmp), args.out, transports, compile_models
        )
        for section in (s for s in SECTIONS if s in only):
            run, render, title = RUNNERS[section]
            ctx.section = section
            t0 = time.perf_counter()
            try:
                result = run(ctx)
            except Exception as err:  # noqa: BLE001 - a failed section is reported, the rest run
                failed.append(section)
                trace = traceback.format_exc()
                (args.out / f"{section}.error.txt").write_text(trace)
                print(
                    f"\n### {title}\n\nFAILED: {type(err).__name__}: {err}\n{trace[-3000:]}",
                    flush=True,
                )
                continue
            result["seconds"] = round(time.perf_counter() - t0, 1)
            results[section] = result
            text = f"### {title}\n\n{render(result)}\n\n({result['seconds']} s)"
            (args.out / f"{section}.json").write_text(json.dumps({**head, **result}, indent=2))
            (args.out / f"{section}.md").write_text(text + "\n")
            print(f"\n{text}", flush=True)
    summary = "### Summary\n\n" + markdown_table(
        ["what", "measured", "target"], summary_rows(results)
    )
    if failed:
        summary += f"\n\nFAILED sections: {', '.join(failed)} (see <section>.error.txt)"
    summary += f"\n\n(total {time.perf_counter() - start:.1f} s)"
    (args.out / "summary.md").write_text(summary + "\n")
    print(f"\n{summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
