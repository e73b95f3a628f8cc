"""`--retrain`: the search's best architecture trained fully with KD from the teacher, on the
config's own data (its train_subset if it has one), and scored on the test set -- the first and
only time a search's output meets the test set."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from dml_cluster.run_folder import write_json_atomic
from dml_cluster.search.evaluate import peer_name, round_config, train_cohort
from dml_cluster.search.settings import SearchConfig
from dml_cluster.search.space import Arch


def retrain(
    scfg: SearchConfig, record: dict[str, Any], folder: Path, nproc: bool = False
) -> dict[str, Any]:
    """Train `record`'s architecture with KD once per `search.retrain.seeds`; a seed whose
    run folder already holds a summary is read, not trained again. Writes retrain.json."""
    arch = Arch.from_dict(record["arch"])
    accuracies = []
    epochs = 0
    for seed in scfg.search.retrain.seeds:
        cfg = round_config(scfg, [arch], folder / "retrain", f"seed-{seed}", retrain_seed=seed)
        summary_path = cfg.run.dir / "summary.json"
        if not summary_path.exists():
            train_cohort(cfg, nproc)
        summary = json.loads(summary_path.read_text())
        accuracies.append(summary["peers"][peer_name(arch)]["final_accuracy"])
        epochs = cfg.train.epochs
    result = {
        "hash": record["hash"],
        "arch": record["arch"],
        "seeds": list(scfg.search.retrain.seeds),
        "epochs": epochs,
        "test_accuracy": accuracies,
        "mean": statistics.fmean(accuracies),
        "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "latency_ms": record["latency_ms"],
        "mflops": record["mflops"],
        "params": record["params"],
    }
    write_json_atomic(folder / "retrain.json", result)
    return result
