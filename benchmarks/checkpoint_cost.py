"""What a cohort checkpoint costs: one peer's save (serialise, sha256, write, fsync, rename,
manifest, prune) and its restore, per model, on this machine's disk; and, to set them against,
the model's training step (forward, cross-entropy, backward, SGD; batch 128, one thread) measured
in the same run, with the share of training time a save every 500 steps (the default
`checkpoint.every_steps`) takes.

One process, one peer, the confirmation over an in-process bus (the zmq or torch confirmation adds
one small exchange, a few hundred microseconds). Run from the repo root:

    .venv/bin/python benchmarks/checkpoint_cost.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, markdown_table, provenance, provenance_lines  # noqa: E402

from dml_cluster.checkpoint import CohortCheckpoints, Position  # noqa: E402
from dml_cluster.cohort import Peer, build_peer  # noqa: E402
from dml_cluster.config import parse_config  # noqa: E402
from dml_cluster.control import LocalControl  # noqa: E402

MODELS = [  # (model, args, input shape, classes)
    ("mlp", {"hidden": [256, 128]}, (1, 8, 8), 10),
    ("small_cnn", {"width": 16}, (1, 8, 8), 10),
    ("resnet20", {}, (3, 32, 32), 10),
    ("wrn16_2", {}, (3, 32, 32), 100),
    ("resnet18", {}, (3, 32, 32), 10),
]


EVERY_STEPS = 500  # the default checkpoint.every_steps
STEP_BATCH = 128


def step_seconds(peer: Peer, shape: tuple[int, int, int], classes: int, repeats: int) -> float:
    """Median of `repeats` training steps of the peer's model (after one warm-up step)."""
    x, y = torch.randn(STEP_BATCH, *shape), torch.randint(0, classes, (STEP_BATCH,))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        peer.optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(peer.model(x), y).backward()
        peer.optimizer.step()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[repeats // 2]


def measure(model: str, args: dict, shape: tuple[int, int, int], classes: int, repeats: int):
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        cfg = parse_config(
            {
                "run": {"out_dir": tmp, "name": "bench"},
                "cohort": {"size": 1, "model": model, "args": args},
                "checkpoint": {"keep": 2},
            }
        )
        peer = build_peer(cfg, 0, shape, classes, torch.device("cpu"))
        # training steps (timed) so the momentum buffers exist, as in a real checkpoint
        step_s = step_seconds(peer, shape, classes, repeats)
        checkpoints = CohortCheckpoints(cfg, Path(tmp) / "bench")
        control = LocalControl()
        saves, restores = [], []
        for step in range(1, repeats + 1):
            t0 = time.perf_counter()
            folder = checkpoints.save(Position(0, step, step), {0: peer}, [], control)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpoints.restore({0: peer}, control)
            restores.append(time.perf_counter() - t0)
        size = (folder / f"{peer.name}.pt").stat().st_size
    params = sum(p.numel() for p in peer.model.parameters())
    return {
        "model": model,
        "params": params,
        "file_mb": size / 1e6,
        "save_ms": sorted(saves)[len(saves) // 2] * 1e3,
        "restore_ms": sorted(restores)[len(restores) // 2] * 1e3,
        "step_ms": step_s * 1e3,
        "save_share_pct": 100 * sorted(saves)[len(saves) // 2] / (EVERY_STEPS * step_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(*m, repeats=args.repeats) for m in MODELS]
    print(provenance_lines())
    print(machine())
    header = [
        "model",
        "input",
        "parameters",
        "file MB",
        "save ms (median)",
        "restore ms (median)",
        f"train step ms (batch {STEP_BATCH}, median)",
        f"a save every {EVERY_STEPS} steps, % of training",
    ]
    table = [
        [
            r["model"],
            "x".join(map(str, shape)),
            f"{r['params']:,}",
            r["file_mb"],
            r["save_ms"],
            r["restore_ms"],
            r["step_ms"],
            f"{r['save_share_pct']:.3f}",
        ]
        for r, (_, _, shape, _) in zip(rows, MODELS, strict=True)
    ]
    print(markdown_table(header, table))
    if args.json:
        args.json.write_text(
            json.dumps({**provenance(), "machine": machine(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
