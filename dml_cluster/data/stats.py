"""Normalisation statistics: given by the dataset or config, else computed once from the train
split and recorded in the run folder (`data.json`), where a resumed run finds them again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dml_cluster.data.dataset import Dataset, Normalisation
from dml_cluster.data.scan import SplitPass, UnreadableSamples
from dml_cluster.run_folder import write_json_atomic

DATA_FILE = "data.json"
"""The run folder's record of the data a run trains on (written by the reporting process)."""


def data_record(dataset: Dataset, normalisation: Normalisation) -> dict[str, Any]:
    """What `data.json` holds: where the data came from, its size, classes and statistics."""
    return {
        "dataset": dataset.name,
        "source": json.loads(json.dumps(dataset.source, default=str)),  # JSON-safe options
        "num_train": len(dataset.train),
        "num_test": len(dataset.test),
        "input_shape": list(dataset.input_shape),
        "class_names": list(dataset.class_names),
        "normalisation": normalisation.to_json(),
    }


def record_data(path: Path, dataset: Dataset, normalisation: Normalisation) -> None:
    """Write `data.json` in the run folder (made here when no launcher has made it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data_record(dataset, normalisation))


def _recorded(path: Path, dataset: Dataset) -> Normalisation | None:
    """The statistics an earlier start of this run recorded for the same data, if any."""
    identity = ("dataset", "source", "num_train", "input_shape")
    expected = data_record(dataset, Normalisation((0.0,), (1.0,)))
    try:
        record = json.loads(path.read_text())
        if any(record.get(k) != expected[k] for k in identity):
            return None
        stats = record["normalisation"]
        return Normalisation(tuple(stats["mean"]), tuple(stats["std"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compute_normalisation(dataset: Dataset, workers: int) -> Normalisation:
    """Per-channel mean and std of the train split, in one ordered pass (float64 sums). A pass
    that met unreadable samples reads on to the end and raises `UnreadableSamples` naming them."""
    reading = SplitPass(dataset.train, "train", dataset.name, workers)
    channels = dataset.input_shape[0]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for batch in reading:
        x = batch.x.to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if reading.failures:
        raise UnreadableSamples(dataset.name, reading.failures)
    mean = total / max(count, 1)
    std = (squares / max(count, 1) - mean.square()).clamp(min=0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return Normalisation(tuple(mean.tolist()), tuple(std.tolist()))


def resolve_normalisation(dataset: Dataset, recorded: Path, workers: int) -> Normalisation:
    """The dataset's own statistics, else those recorded at `recorded`, else computed now."""
    if dataset.normalisation is not None:
        return dataset.normalisation
    return _recorded(recorded, dataset) or compute_normalisation(dataset, workers)
