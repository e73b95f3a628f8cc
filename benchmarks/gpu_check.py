"""The GPU check: one command for a machine with one or more CUDA GPUs.

    python benchmarks/gpu_check.py [--out gpu_check.json]      # on the GPU machine
    python benchmarks/gpu_check.py --dry-run                    # anywhere: CPU, gloo, tiny

(a) parity: a 2-peer cohort (small_cnn + resnet20, synthetic 3x32x32 data, run.deterministic
    strict) trained by the one-process engine on the GPU(s), then under torchrun over the torch
    transport (NCCL when each peer has a GPU of its own, else gloo) and over zmq: the largest
    |w - w_engine| over every weight (0 = bitwise).
(b) bf16 + channels_last + torch.compile (one-process engine): the training loss falls.
(c) samples/s per peer: the K-process cohort (K = 2, 4 sharing the machine's GPUs), the
    one-process engine with the same K, and a plain hand-written PyTorch loop of one model on the
    same batches (the ceiling).

It prints Markdown tables and writes JSON. Every run is the real `dml-cluster train` command
(`python -m dml_cluster`), so `--dry-run` goes through the same code path on CPU devices with
gloo, at tiny sizes (CI runs it: tests/test_benchmarks_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import machine, markdown_table  # noqa: E402

from dml_cluster.config import parse_config  # noqa: E402
from dml_cluster.devices import process_group_backend  # noqa: E402
from dml_cluster.models import build_model  # noqa: E402

PARITY_PEERS = [{"name": "cnn", "model": "small_cnn"}, {"name": "resnet20", "model": "resnet20"}]
WARMUP_STEPS = 3  # left out of the timings (cuDNN/compile warm-up, first allocations)


@dataclass(frozen=True)
class Sizes:
    """How big the check runs: the GPU sizes, or tiny ones for --dry-run."""

    shape: tuple[int, int, int]
    train_size: int
    batch_size: int
    steps: int
    mixed_steps: int
    ks: tuple[int, ...]
    timeout_s: float

    @classmethod
    def pick(cls, dry_run: bool, ks: tuple[int, ...] | None) -> Sizes:
        if dry_run:
            return cls((3, 8, 8), 256, 16, 8, 12, ks or (2,), 300)
        return cls((3, 32, 32), 8192, 128, 40, 60, ks or (2, 4), 420)


def base_config(sizes: Sizes, out: Path, name: str, peers: list[dict[str, Any]]) -> dict:
    return {
        "run": {"name": name, "out_dir": str(out), "seed": 0, "log_every": 1},
        "data": {
            "name": "synthetic",
            "options": {
                "shape": list(sizes.shape),
                "train_size": sizes.train_size,
                "test_size": 256,
            },
            "batch_size": sizes.batch_size,
        },
        "cohort": {"peers": peers},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1, "max_steps": sizes.steps},
        "metrics": {"enabled": False},
        "checkpoint": {"enabled": False},
    }


@dataclass
class Run:
    """One `dml-cluster train` and what it left."""

    name: str
    run_dir: Path
    seconds: float
    returncode: int
    stderr: str

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            p.stem: torch.load(p, weights_only=True)
            for p in sorted((self.run_dir / "final").glob("*.pt"))
        }

    def records(self, peer: str) -> list[dict[str, Any]]:
        path = self.run_dir / "peers" / f"{peer}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def train(cfg: dict, workdir: Path, timeout_s: float, **settings: Any) -> Run:
    """Write `cfg` (with dotted `settings`) and run `python -m dml_cluster train` on it."""
    path = workdir / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "dml_cluster", "train", str(path)]
    for key, value in settings.items():
        command += ["--set", f"{key.replace('__', '.')}={json.dumps(value)}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(
            f"gpu_check: run {cfg['run']['name']} took over {timeout_s:.0f} s"
        ) from None
    run = Run(
        cfg["run"]["name"],
        Path(cfg["run"]["out_dir"]) / cfg["run"]["name"],
        time.perf_counter() - start,
        done.returncode,
        done.stderr,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"gpu_check: run {run.name} failed (exit {done.returncode}):\n{tail}")
    return run


def max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for peer in a:
        for key in a[peer]:
            diff = (a[peer][key].double() - b[peer][key].double()).abs().max().item()
            worst = max(worst, diff)
    return worst


def samples_per_s(run: Run, peer: str, batch_size: int) -> float:
    """A peer's training throughput: batch / median step time after the warm-up steps."""
    steps = [r["step_seconds"] for r in run.records(peer) if r["event"] == "train"]
    timed = steps[WARMUP_STEPS:] or steps
    return batch_size / statistics.median(timed)


# -- (a) parity -------------------------------------------------------------------------------


def check_parity(
    sizes: Sizes, work: Path, transports: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Run]]:
    runs = {}
    for transport in ("local", *transports):
        cfg = base_config(sizes, work / "runs", f"parity-{transport}", PARITY_PEERS)
        runs[transport] = train(
            cfg, work, sizes.timeout_s, bus__transport=transport, run__deterministic="strict"
        )
    engine = runs["local"].weights()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cohort = parse_config(base_config(sizes, work, "probe", PARITY_PEERS))
    result = {
        "backend": process_group_backend(cohort, len(PARITY_PEERS), gpus=gpus),
        "max_abs_diff": {t: max_diff(engine, runs[t].weights()) for t in transports},
        "seconds": {t: round(r.seconds, 1) for t, r in runs.items()},
    }
    return result, runs


# -- (b) bf16 + channels_last + compile -------------------------------------------------------


def check_mixed(sizes: Sizes, work: Path, compile_models: bool) -> dict[str, Any]:
    cfg = base_config(sizes, work / "runs", "mixed", PARITY_PEERS)
    cfg["train"]["max_steps"] = sizes.mixed_steps
    run = train(
        cfg,
        work,
        sizes.timeout_s,
        run__precision="bf16",
        run__channels_last=True,
        run__compile=compile_models,
        run__deterministic="warn",
    )
    result: dict[str, Any] = {"compile": compile_models, "peers": {}}
    for peer in (p["name"] for p in PARITY_PEERS):
        ce = [r["ce"] for r in run.records(peer) if r["event"] == "train"]
        first, last = statistics.mean(ce[:3]), statistics.mean(ce[-3:])
        result["peers"][peer] = {"first_ce": first, "last_ce": last, "falls": last < first}
    result["compile_note"] = next(
        (line for line in run.stderr.splitlines() if "run.compile" in line), ""
    )
    return result


# -- (c) throughput ---------------------------------------------------------------------------


def plain_loop(sizes: Sizes, device: torch.device, model_name: str) -> float:
    """Samples/s of a hand-written loop of one model on the same synthetic batches (the
    ceiling: no cohort, no exchange, no logging)."""
    from dml_cluster.data import load_dataset

    data = load_dataset(
        "synthetic", None, shape=list(sizes.shape), train_size=sizes.train_size, test_size=256
    )
    x_all, y_all = (t.to(device) for t in data.train.gather(range(len(data.train))))
    torch.manual_seed(0)
    model = build_model(model_name, sizes.shape, data.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    bs, times = sizes.batch_size, []
    for step in range(sizes.steps):
        i = (step * bs) % (len(y_all) - bs + 1)
        x, y = x_all[i : i + bs], y_all[i : i + bs]
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # the trainer reads its losses every step too
        times.append(time.perf_counter() - t0)
    return bs / statistics.median(times[WARMUP_STEPS:] or times)


def measure_throughput(
    sizes: Sizes, work: Path, parity: dict[str, Run], device: torch.device, transport: str
) -> list[dict[str, Any]]:
    """Per-peer samples/s of the cohort of K peers as K processes over `transport` and as one
    process, and of the plain loop."""
    rows = []
    for k in sizes.ks:
        peers = [
            dict(PARITY_PEERS[i % 2], name=f"{PARITY_PEERS[i % 2]['name']}-{i}") for i in range(k)
        ]
        if k == len(PARITY_PEERS):  # the parity runs are these runs
            peers = PARITY_PEERS
            layouts = {
                f"processes ({transport})": parity[transport],
                "one process": parity["local"],
            }
        else:
            layouts = {
                f"processes ({transport})": train(
                    base_config(sizes, work / "runs", f"speed-{k}-{transport}", peers),
                    work,
                    sizes.timeout_s,
                    bus__transport=transport,
                ),
                "one process": train(
                    base_config(sizes, work / "runs", f"speed-{k}-one", peers),
                    work,
                    sizes.timeout_s,
                ),
            }
        for layout, run in layouts.items():
            for peer in peers:
                rows.append(
                    {
                        "k": k,
                        "layout": layout,
                        "peer": peer["name"],
                        "samples_per_s": samples_per_s(run, peer["name"], sizes.batch_size),
                    }
                )
    for model in sorted({p["model"] for p in PARITY_PEERS}):
        rows.append(
            {
                "k": 1,
                "layout": "plain PyTorch loop",
                "peer": model,
                "samples_per_s": plain_loop(sizes, device, model),
            }
        )
    return rows


# -- the report -------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    parity, mixed = results["parity"], results["mixed"]
    lines = [
        f"## GPU check{' (dry run: CPU, gloo, tiny sizes)' if results['dry_run'] else ''}",
        "",
        f"Machine: {results['machine']}",
        f"Devices: {results['devices']}",
        f"Command: `{results['command']}`",
        "",
        "### (a) parity with the one-process engine (run.deterministic: strict)",
        "",
        markdown_table(
            ["transport", "messages over", "max abs weight diff", "seconds"],
            [
                [
                    t,
                    parity["backend"] if t == "torch" else "(zmq sockets)",
                    f"{diff:.3g}",
                    parity["seconds"][t],
                ]
                for t, diff in parity["max_abs_diff"].items()
            ],
        ),
        "",
        f"### (b) bf16 + channels_last + compile={mixed['compile']} (one process)",
        "",
        markdown_table(
            ["peer", "CE first 3 steps", "CE last 3 steps", "loss falls"],
            [
                [p, f"{v['first_ce']:.3f}", f"{v['last_ce']:.3f}", "yes" if v["falls"] else "NO"]
                for p, v in mixed["peers"].items()
            ],
        ),
    ]
    if mixed["compile_note"]:
        lines += ["", f"Note: {mixed['compile_note']}"]
    lines += [
        "",
        "### (c) samples/s per peer",
        "",
        markdown_table(
            ["K", "layout", "peer", "samples/s"],
            [
                [r["k"], r["layout"], r["peer"], float(r["samples_per_s"])]
                for r in results["throughput"]
            ],
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU devices, gloo, tiny sizes")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--ks", help="cohort sizes to time, e.g. 2,4 (default: 2,4; dry run 2)")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile in (b): auto = on a GPU, off in a dry run (compiling on a small CPU "
        "takes minutes)",
    )
    parser.add_argument(
        "--transports", default="torch,zmq",
        help="transports of the parity check (the last one is timed in (c)); default torch,zmq",
    )  # fmt: skip
    args = parser.parse_args(argv)
    transports = tuple(t for t in args.transports.split(",") if t)
    if not transports or set(transports) - {"torch", "zmq"}:
        parser.error("--transports: a comma-separated list of torch and zmq")
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU visible (torch "
            f"{torch.__version__}); run with --dry-run to exercise the CPU path",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU devices and gloo, whatever the machine has
    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else None
    sizes = Sizes.pick(args.dry_run, ks)
    compile_models = args.compile == "on" or (args.compile == "auto" and not args.dry_run)
    device = torch.device("cpu" if args.dry_run else "cuda")
    devices = (
        "cpu"
        if args.dry_run
        else ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    )
    results: dict[str, Any] = {
        "dry_run": args.dry_run,
        "machine": machine(),
        "devices": devices,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "sizes": asdict(sizes),
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        results["parity"], parity_runs = check_parity(sizes, work, transports)
        results["mixed"] = check_mixed(sizes, work, compile_models)
        results["throughput"] = measure_throughput(sizes, work, parity_runs, device, transports[-1])
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(report(results))
    print(f"\n(total {results['seconds']} s)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
