"""Samples that cannot be read, found before training where a pass over the split is cheap.

Two passes read a split whole before the first step: the statistics pass over the train split
(when the statistics are neither given nor recorded), and the check of the evaluation split,
which every evaluation reads whole anyway (skipped for in-memory splits, which hold decoded
tensors already). Both read every sample, also past one that fails, so a run stops once, naming
the first few of all the unreadable samples and their count, before anything is written. What
no pass reads before training (the train split when `data.normalize` is given, or the
statistics are recorded) is still checked as it is read: the first unreadable sample stops
the run with one line naming it (loader.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from dml_cluster.data.loader import Batch, BatchReader, Failure, InOrder, LoadFailure, make_loader
from dml_cluster.errors import DataError

PASS_BATCH = 256
"""Samples per batch of a pass (each batch is one task for a loader worker)."""

NAMED = 3
"""How many unreadable samples the one line names (the count covers them all)."""


class UnreadableSamples(DataError):
    """Samples that cannot be read, found by a pass over whole splits: one line naming the
    first `NAMED` of them and counting all."""

    def __init__(self, dataset: str, failures: Sequence[Failure]) -> None:
        if not failures:
            raise ValueError("UnreadableSamples needs at least one failure")
        self.dataset, self.failures = dataset, tuple(failures)
        super().__init__(_one_line(dataset, self.failures))


def _one_line(dataset: str, failures: Sequence[Failure]) -> str:
    if len(failures) == 1:
        return failures[0].line  # the line the sample alone gives (as met during training)
    noun = "images" if all(f.image for f in failures) else "samples"
    per_split = ", ".join(f"{split} {n}" for split, n in Counter(f.split for f in failures).items())
    named = ", ".join(f"{f.where} ({f.why})" for f in failures[:NAMED])
    more = f", and {len(failures) - NAMED} more" if len(failures) > NAMED else ""
    return (
        f"{dataset}: {len(failures)} {noun} cannot be read ({per_split}): {named}{more}; "
        "replace or remove them"
    )


class SplitPass:
    """One ordered pass over a whole split by up to `workers` loader processes (no more than it
    has batches; none for a single batch, which one process reads either way): iterating yields
    the batches read whole; `failures` then holds every sample that could not be read."""

    def __init__(self, split: Any, name: str, dataset: str, workers: int) -> None:
        self.reader = BatchReader(split, name, dataset, every_item=True)
        self.sampler = InOrder(len(self.reader), PASS_BATCH)
        batches = len(self.sampler)
        self.workers = min(workers, batches) if batches > 1 else 0
        self.failures: list[Failure] = []

    def __iter__(self) -> Iterator[Batch]:
        for batch in make_loader(self.reader, self.sampler, self.workers):
            if isinstance(batch, LoadFailure):
                self.failures.extend(batch.failures)
            else:
                yield batch


def unreadable_in(split: Any, name: str, dataset: str, workers: int) -> list[Failure]:
    """Every sample of `split` that cannot be read (one pass, the images decoded and dropped)."""
    reading = SplitPass(split, name, dataset, workers)
    for _ in reading:
        pass
    return reading.failures
