"""The data as a run trains on it, prepared once before anything is written to the run folder:
the dataset with its training subset, its normalisation, the semi-supervised labels; or, for
`data.name: text`, the tokenized splits. `data_path` gives a peer process its batches of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dml_cluster.config import Config
from dml_cluster.data import load_dataset, loader_options
from dml_cluster.data.dataset import Dataset, Normalisation, take, targets
from dml_cluster.data.loader import DataPath, Failure, default_workers
from dml_cluster.data.sampler import steps_per_epoch
from dml_cluster.data.scan import UnreadableSamples, unreadable_in
from dml_cluster.data.split import labelled_mask, mask_labels, training_subset
from dml_cluster.data.stats import DATA_FILE, record_data, resolve_normalisation
from dml_cluster.data.text import TextData, load_text_config
from dml_cluster.data.text_path import TextPath
from dml_cluster.errors import ConfigError
from dml_cluster.run_folder import write_json_atomic


@dataclass(frozen=True)
class RunData:
    """The data as a run trains on it: the dataset (its train split subset by
    `data.train_subset`), its normalisation, the semi-supervised labels (-1: unlabelled) or None,
    and the number of loader workers. Text data: the tokenized splits, no normalisation."""

    dataset: Dataset | TextData
    normalisation: Normalisation | None
    labels: Tensor | None
    workers: int

    @property
    def is_text(self) -> bool:
        return isinstance(self.dataset, TextData)

    def record(self, path: Path) -> None:
        """Write the run folder's `data.json`: what the run trains on."""
        if isinstance(self.dataset, TextData):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, self.dataset.record())
        else:
            assert self.normalisation is not None
            record_data(path, self.dataset, self.normalisation)


def prepare_data(cfg: Config, run_dir: Path | None = None) -> RunData:
    """Load and check the run's data; the launchers call it before the metrics endpoint or the
    trainer writes into the run folder, so bad data (a folder, a factory, unreadable samples in
    the statistics pass or the evaluation split: data/scan.py; a batch larger than the training
    split; a missing, empty or non-UTF-8 text file) is one line and the folder is left as it
    was. `run_dir`: where the run's recorded statistics are (default: the config's run folder).
    Text is tokenized here, once (cached under the output directory)."""
    if cfg.data.name == "text":
        text = load_text_config(cfg.data, cfg.run.out_dir)
        return RunData(text, None, None, cfg.data.workers or 0)
    data = load_dataset(cfg.data.name, cfg.data.root, **loader_options(cfg.data))
    train, labels = data.train, None
    if cfg.data.train_subset is not None:
        keep = training_subset(targets(train), cfg.data.train_subset, cfg.run.seed)
        train = take(train, keep)
    if cfg.data.label_fraction < 1.0:
        train_y = targets(train)
        labels = mask_labels(train_y, labelled_mask(train_y, cfg.data.label_fraction, cfg.run.seed))
    data = dataclasses.replace(data, train=train)
    if steps_per_epoch(len(train), cfg.data.batch_size) == 0:  # full batches only
        raise ConfigError(
            f"config error: data.batch_size: {cfg.data.batch_size} exceeds the {len(train)} "
            "training samples"
        )
    workers = default_workers(data) if cfg.data.workers is None else cfg.data.workers
    failures: list[Failure] = []
    try:
        stats = resolve_normalisation(data, (run_dir or cfg.run.dir) / DATA_FILE, workers)
    except UnreadableSamples as err:  # the train split's: the evaluation split's join them
        failures.extend(err.failures)
    if not data.in_memory:  # decoded as read: every evaluation reads it whole, so now once
        split = str(data.source.get("test", "test"))  # an image folder's val/ or test/
        failures.extend(unreadable_in(data.test, split, data.name, workers))
    if failures:
        raise UnreadableSamples(data.name, failures)
    return RunData(data, stats, labels, workers)


def data_path(
    cfg: Config, prepared: RunData, device: torch.device, shard: tuple[int, int] = (0, 1)
) -> DataPath | TextPath:
    """A peer process's batches of the run's data, on `device`; `shard` (r, D): the slice of
    each batch a data-parallel replica reads (dml_cluster.replicas)."""
    data = prepared.dataset
    if isinstance(data, TextData):
        return TextPath(
            data, device, batch_size=cfg.data.batch_size,
            eval_batch_size=cfg.data.eval_batch_size, seed=cfg.run.seed,
            workers=prepared.workers, prefetch=cfg.data.prefetch, shard=shard,
        )  # fmt: skip
    assert prepared.normalisation is not None
    return DataPath(
        data,
        prepared.normalisation,
        device,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        seed=cfg.run.seed,
        workers=prepared.workers,
        prefetch=cfg.data.prefetch,
        crop_padding=cfg.data.augment.crop_padding,
        flip=data.flip if cfg.data.augment.flip is None else cfg.data.augment.flip,
        labels=prepared.labels,
        shard=shard,
    )
