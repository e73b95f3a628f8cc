"""Does the controller learn? PPO and REINFORCE vs random search on a synthetic reward whose
optimum is known, with no training involved (benchmarks/SEARCH.md, "Controller").

    .venv/bin/python benchmarks/search_synthetic.py              # 5 seeds, 1200 samples each
    .venv/bin/python benchmarks/search_synthetic.py --seeds 10 --budget 2000

The reward of a token sequence (35 decisions: 5 blocks x 7 of the default space) is the
fraction of its decisions equal to a hidden optimum's, drawn per seed; the optimum region is
reward >= 0.9 (at most 3 of the 35 decisions wrong). Each controller proposes `--per-round`
sequences a round and learns from their rewards (random never learns). Reported per controller:
samples until the first proposal in the optimum region (censored at the budget), and the best
reward found after 200 / 600 / all samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import provenance, provenance_lines  # noqa: E402

from dml_cluster.search.controller import build_controller  # noqa: E402
from dml_cluster.search.settings import ControllerSettings, SpaceSettings  # noqa: E402

REGION = 0.9
CHECKPOINTS = (200, 600)


def synthetic_run(name: str, seed: int, budget: int, per_round: int) -> dict[str, object]:
    space = SpaceSettings().build()
    vocab, kinds = space.vocabulary(), space.token_kinds()
    g = torch.Generator().manual_seed(10_000 + seed)
    optimum = torch.tensor([int(torch.randint(n, (1,), generator=g)) for n in vocab])
    controller = build_controller(vocab, kinds, ControllerSettings(name=name), seed)
    first_hit, best, best_at = None, 0.0, {}
    seen = 0
    while seen < budget:
        samples = controller.sample(per_round)
        rewards = [float((torch.tensor(s.tokens) == optimum).float().mean()) for s in samples]
        for r in rewards:
            seen += 1
            best = max(best, r)
            if first_hit is None and r >= REGION:
                first_hit = seen
            for c in CHECKPOINTS:
                if seen == c:
                    best_at[c] = best
        controller.update(samples, rewards)
    return {"first_hit": first_hit, "best": best, "best_at": best_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=1200)
    parser.add_argument("--per-round", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the raw results (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, object]]] = {}
    t0 = time.perf_counter()
    for name in ("ppo", "reinforce", "random"):
        results[name] = [
            synthetic_run(name, s, args.budget, args.per_round) for s in range(args.seeds)
        ]
    print(provenance_lines())
    print(
        f"| controller | reached region (of {args.seeds}) | samples to region: median "
        f"(per seed) | best @200 | best @600 | best @{args.budget} |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for name, runs in results.items():
        hits = [r["first_hit"] for r in runs]
        reached = [h for h in hits if h is not None]
        median = statistics.median(h if h is not None else float("inf") for h in hits)
        per_seed = ", ".join(str(h) if h is not None else f">{args.budget}" for h in hits)
        cells = [statistics.fmean(float(r["best_at"][c]) for r in runs) for c in CHECKPOINTS]
        final = statistics.fmean(float(r["best"]) for r in runs)
        med = f"{median:.0f}" if median != float("inf") else f">{args.budget}"
        print(
            f"| {name} | {len(reached)} | {med} ({per_seed}) | {cells[0]:.3f} | "
            f"{cells[1]:.3f} | {final:.3f} |"
        )
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    if args.out:
        args.out.write_text(json.dumps({**provenance(), "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
