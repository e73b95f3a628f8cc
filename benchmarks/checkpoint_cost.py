"""What a cohort checkpoint costs: one peer's save (serialise, sha256, write, fsync, rename,
manifest, prune) and its restore, per model, on this machine's disk.

One process, one peer, the confirmation over an in-process bus (the zmq or torch confirmation adds
one small exchange, a few hundred microseconds). Run from the repo root:

    .venv/bin/python benchmarks/checkpoint_cost.py --repeats 5
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
from bench_common import machine, markdown_table  # noqa: E402

from dml_cluster.checkpoint import CohortCheckpoints, Position  # noqa: E402
from dml_cluster.cohort import build_peer  # noqa: E402
from dml_cluster.config import parse_config  # noqa: E402
from dml_cluster.control import LocalControl  # noqa: E402

MODELS = [  # (model, args, input shape, classes)
    ("mlp", {"hidden": [256, 128]}, (1, 8, 8), 10),
    ("small_cnn", {"width": 16}, (1, 8, 8), 10),
    ("resnet20", {}, (3, 32, 32), 10),
    ("wrn16_2", {}, (3, 32, 32), 100),
    ("resnet18", {}, (3, 32, 32), 10),
]


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
        # one optimizer step so the momentum buffers exist, as in a real checkpoint
        peer.model(torch.randn(2, *shape)).sum().backward()
        peer.optimizer.step()
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(*m, repeats=args.repeats) for m in MODELS]
    print(machine())
    print(
        markdown_table(
            ["model", "parameters", "file MB", "save ms (median)", "restore ms (median)"],
            [[r["model"], r["params"], r["file_mb"], r["save_ms"], r["restore_ms"]] for r in rows],
        )
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
