"""Re-evaluate finished runs' final weights over the dense float32 wire: the students' own
predictions, apart from how the run's `bus.encoding` carried them.

Since the evaluation-wire fix a run's own evaluation already reports these figures (its
evaluation exchange travels dense float32 whatever `bus.encoding` is), so for a run trained
since then this script prints the same numbers twice; it stays for the runs trained before it,
whose numbers BENCHMARKS.md and LM.md quote. Those runs' evaluation scored every peer's
predictions as they travelled (top-k or sampled rows densified, the rest of the mass spread
evenly), so their NLL / perplexity under a sparse encoding mixes what the students learnt with
what the encoding drops ("as_travelled" below). This reads each run folder's
config.yaml, sets the wire to dense float32 (dropping bus.k / bus.samples), loads
final/<peer>.pt into the one-process engine and runs its evaluation (`CohortTrainer.evaluate`,
the same code the run used), writing nothing into the run folder.

    .venv/bin/python benchmarks/own_eval.py RUN_DIR [RUN_DIR ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import provenance  # noqa: E402

from dml_cluster.bus.local import LocalBus  # noqa: E402
from dml_cluster.config import parse_config  # noqa: E402
from dml_cluster.determinism import set_determinism  # noqa: E402
from dml_cluster.launch.transports import bus_encoding  # noqa: E402
from dml_cluster.trainer import CohortTrainer, Placement  # noqa: E402

FIGURES = ("accuracy", "nll", "perplexity", "ece", "entropy")


def own_report(run: Path) -> dict[str, Any]:
    """The evaluation report of `run`'s final weights over the dense float32 wire."""
    raw = yaml.safe_load((run / "config.yaml").read_text())
    bus = raw.setdefault("bus", {})
    for key in ("k", "samples", "sparse_dtype"):
        bus.pop(key, None)
    bus["encoding"] = "float32"
    with tempfile.TemporaryDirectory() as scratch:
        raw["run"] = {**raw.get("run", {}), "out_dir": scratch, "progress_every_s": 0}
        raw["metrics"] = {**raw.get("metrics", {}), "enabled": False}
        cfg = parse_config(raw)
        set_determinism(cfg)
        hosted = tuple(range(len(cfg.peers)))
        trainer = CohortTrainer(
            cfg, LocalBus(bus_encoding(cfg)), Placement(hosted, torch.device("cpu"), True)
        )
        try:
            for peer in trainer.peers.values():
                peer.model.load_state_dict(torch.load(run / "final" / f"{peer.name}.pt"))
            return trainer.evaluate(after_step=0)
        finally:
            trainer.batches.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = {**provenance(), "runs": {}}
    for run in args.runs:
        travelled = json.loads(
            next(
                line
                for line in reversed((run / "cohort.jsonl").read_text().splitlines())
                if '"eval"' in line
            )  # fmt: skip
        )
        own = own_report(run)
        out["runs"][str(run)] = {}
        for name in sorted(own["peers"]):
            pick = {f: own["peers"][name].get(f) for f in FIGURES if f in own["peers"][name]}
            was = {f: travelled["peers"][name].get(f) for f in FIGURES
                   if f in travelled["peers"][name]}  # fmt: skip
            out["runs"][str(run)][name] = {"own": pick, "as_travelled": was}
            line = "  ".join(f"{f} {pick[f]:.4f} (as travelled {was.get(f, float('nan')):.4f})"
                             for f in pick)  # fmt: skip
            print(f"{run.name}/{name}: {line}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
