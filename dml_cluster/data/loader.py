"""The one data path: a torch DataLoader per split, fed the step's indices by a batch sampler;
its worker processes live for the whole run (persistent across epochs and evaluations).

Every peer derives the same index list for every step from (seed, epoch) (`StepSampler`), so
every peer reads the same batch; a run resumed mid-epoch starts the sampler at the step it stopped
at and never reads the skipped batches. Worker processes (`data.workers`) read and decode items
into compact host tensors (uint8 images); the peer's device does the rest: the copy (pinned and
non-blocking on CUDA), float32 + normalisation, and the seeded augmentation (augment.py), whose
random draws depend on (seed, epoch, step) only, never on which worker read what.

A sample that cannot be read does not kill a worker with a traceback: the worker hands back a
`LoadFailure` naming it, and the peer stops with one line (`DataError`, exit 2). A reader made
with `every_item` reads the rest of the batch too and names every sample that failed (the passes
before training that look for all of them: data/scan.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from dml_cluster.data.augment import augment_batch
from dml_cluster.data.dataset import Dataset, Normalisation
from dml_cluster.data.images import UnreadableImage
from dml_cluster.data.sampler import batch_indices, epoch_order, fingerprint, shard_rows
from dml_cluster.data.seeding import seeded_generator
from dml_cluster.errors import DataError, typed_first_line
from dml_cluster.signals import held_stop, signal_point

MAX_AUTO_WORKERS = 4
"""The most worker processes `data.workers: null` gives a peer process."""


class Batch(NamedTuple):
    """One batch as read on the host: sample indices [B], images [B, C, H, W], labels [B]."""

    indices: Tensor
    x: Tensor
    y: Tensor


class Failure(NamedTuple):
    """One sample that could not be read: its split, where it is (its file, or its index), why,
    and the one line that says all of it."""

    split: str
    where: str
    why: str
    line: str
    image: bool  # an image file that does not decode (not a user's dataset raising)


class LoadFailure(NamedTuple):
    """A batch that could not be read: the samples that failed (the first alone, unless the
    reader reads `every_item`)."""

    failures: tuple[Failure, ...]

    @property
    def message(self) -> str:
        """The one line to stop with: the first failure's."""
        return self.failures[0].line


class StepSampler(Sampler[list[int]]):
    """The index lists of steps `first`..`stop - 1` of `epoch`: the same in every peer.

    `shard` (r, D): replica r of a peer of D replicas reads the r-th of D equal slices of each
    step's batch, so the D replicas together read the batch of one process per peer."""

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, epoch: int, first: int, stop: int,
        shard: tuple[int, int] = (0, 1),
    ) -> None:  # fmt: skip
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch, self.first, self.stop = epoch, first, stop
        self.shard = shard

    def __iter__(self) -> Iterator[list[int]]:
        if self.epoch > 0:  # read inside the loader's resuming of its workers for the epoch
            signal_point("epoch-boundary")
        order = epoch_order(self.num_samples, self.seed, self.epoch)
        rows = shard_rows(self.batch_size, self.shard)
        for step in range(self.first, self.stop):
            yield batch_indices(order, step, self.batch_size)[rows].tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.first)


class InOrder(Sampler[list[int]]):
    """Consecutive index lists of `batch_size` over the whole split (evaluation)."""

    def __init__(self, num_samples: int, batch_size: int) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.num_samples, self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.num_samples)))

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)


def _describe(split: Any, index: int, name: str) -> str:
    """The file behind sample `index` where the split knows it (ImageFolder's `samples`)."""
    samples = getattr(split, "samples", None)
    if isinstance(samples, Sequence) and 0 <= index < len(samples):
        return str(samples[index][0])
    return f"sample {index} of the {name} split"


class BatchReader(TorchDataset):
    """Reads a whole batch per call (DataLoader's `__getitems__`), in a worker or in the peer.

    A split with `gather` (in memory) is read with one index operation, any other item by item;
    the first item that fails ends the batch, or with `every_item` every item is tried and every
    failure named.
    """

    def __init__(self, split: Any, name: str, dataset: str, every_item: bool = False) -> None:
        self.split, self.name, self.dataset = split, name, dataset
        self.every_item = every_item

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> Batch | LoadFailure:
        gather = getattr(self.split, "gather", None)
        if gather is not None:
            x, y = gather(indices)
            return Batch(torch.as_tensor(indices, dtype=torch.int64), x, y)
        images, labels, failed = [], [], []
        for i in indices:
            try:
                image, label = self.split[i]
            except UnreadableImage as err:
                failed.append(Failure(self.name, str(err.path), err.why, str(err), True))
            except DataError as err:
                where = _describe(self.split, i, self.name)
                failed.append(Failure(self.name, where, str(err), str(err), False))
            except Exception as err:  # a user's dataset may raise anything: name the sample
                where, why = _describe(self.split, i, self.name), typed_first_line(err)
                line = f"{self.dataset}: cannot read {where}: {why}"
                failed.append(Failure(self.name, where, why, line, False))
            else:
                problem = _item_problem(image, label, images[0] if images else None)
                if problem:
                    where = _describe(self.split, i, self.name)
                    line = f"{self.dataset}: {where}: {problem}"
                    failed.append(Failure(self.name, where, problem, line, False))
                else:
                    images.append(image)
                    labels.append(int(label))
            if failed and not self.every_item:
                break
        if failed:
            return LoadFailure(tuple(failed))
        return Batch(
            torch.as_tensor(indices, dtype=torch.int64),
            torch.stack(images),
            torch.as_tensor(labels, dtype=torch.int64),
        )


def _item_problem(image: Any, label: Any, first: Tensor | None) -> str:
    """Why an item is not (image tensor [C, H, W], integer label) like the batch's first; ''."""
    if not isinstance(image, Tensor) or image.ndim != 3:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        return f"an item's image must be a tensor [C, H, W], got {got}"
    if first is not None and (image.shape != first.shape or image.dtype != first.dtype):
        return (
            f"image {tuple(image.shape)} {image.dtype} differs from the batch's first "
            f"{tuple(first.shape)} {first.dtype} (data.image_size resizes images to one size)"
        )
    if isinstance(label, Tensor) and label.numel() == 1:
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, int):
        return f"an item's label must be an integer, got {type(label).__name__}"
    return ""


def _as_is(batch: Batch | LoadFailure) -> Batch | LoadFailure:
    """The collate step: `BatchReader` already made the batch."""
    return batch


def _worker_init(worker_id: int) -> None:
    """A loader worker ignores SIGINT and SIGTERM: torchrun stops a peer with `killpg`, which
    reaches its workers too, and a worker dying first would turn the peer's orderly stop (the
    cohort's agreed stop step and checkpoint) into a "DataLoader worker exited" crash. The peer
    ends its workers itself; a worker whose peer is gone exits on its own (torch's watchdog).
    Until then it has its peer's handlers, which know they are not in their own process
    (signals.py). Nor does it wake its peer's stop watch (the signal wake-up pipe)."""
    if worker_id == 0:
        signal_point("worker-start")
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)


def make_loader(
    reader: BatchReader,
    sampler: Sampler[list[int]],
    workers: int,
    *,
    seed: tuple[int, ...] = (),
    prefetch: int = 2,
    pin_memory: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """A DataLoader over the batches `sampler` asks for, read by `workers` processes (0: in this
    one); `persistent`: its workers live across iterations (each `iter` re-reads the sampler,
    which the caller may have pointed elsewhere in between).

    The loader draws its workers' seeds from a generator of its own, seeded from `seed`: left
    to itself it would draw them from torch's global generator, whose state a checkpoint saves,
    so a resumed run (fewer loaders made) would not end like an uninterrupted one."""
    return DataLoader(
        reader,
        batch_sampler=sampler,
        collate_fn=_as_is,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=persistent and workers > 0,
        generator=seeded_generator("loader", *seed),
        worker_init_fn=_worker_init if workers else None,
    )


def checked(loader: DataLoader) -> Iterator[Batch]:
    """The loader's batches; a sample that cannot be read stops the run with one line
    (`DataError`)."""
    with held_stop():  # Ctrl-C while workers start or resume: raised once they have
        batches = iter(loader)
    for batch in batches:
        if isinstance(batch, LoadFailure):
            raise DataError(batch.message)
        yield batch


def read_batches(
    reader: BatchReader,
    sampler: Sampler[list[int]],
    workers: int,
    *,
    seed: tuple[int, ...] = (),
    prefetch: int = 2,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """The batches `sampler` asks for, by a loader made for this one pass (`make_loader`)."""
    loader = make_loader(
        reader, sampler, workers, seed=seed, prefetch=prefetch, pin_memory=pin_memory
    )
    return checked(loader)


def default_workers(dataset: Dataset) -> int:
    """`data.workers: null`: none for an in-memory dataset (a worker would only copy a slice),
    else the CPUs this process may use, shared among the peer processes of the node, at most
    `MAX_AUTO_WORKERS` and at least 1."""
    if dataset.in_memory:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_AUTO_WORKERS, (cpus or 1) // local))


class DataPath:
    """A peer process's batches: training steps from (seed, epoch), evaluation in order.

    `labels`: train labels to use instead of the dataset's (a semi-supervised run's, with -1 for
    the unlabelled samples), looked up by sample index. `shard` (r, D): this process is replica
    r of a peer of D replicas and reads the r-th slice of each step's batch, each sample
    augmented with the draw the whole batch gives it (the draws of one process per peer).
    """

    def __init__(
        self,
        dataset: Dataset,
        normalisation: Normalisation,
        device: torch.device,
        *,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        workers: int,
        prefetch: int,
        crop_padding: int,
        flip: bool,
        labels: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.dataset, self.normalisation, self.device = dataset, normalisation, device
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.workers, self.prefetch = workers, prefetch
        self.crop_padding, self.flip = crop_padding, flip
        self.labels = labels
        self._stats = normalisation.on(device)
        self.train = BatchReader(dataset.train, "train", dataset.name)
        self.test = BatchReader(dataset.test, "test", dataset.name)
        self.rows = shard_rows(batch_size, shard)
        self._steps = StepSampler(self.num_train, batch_size, seed, 0, 0, 0, shard)
        self._loaders: dict[str, DataLoader] = {}

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def fingerprint(self, indices: Tensor) -> int:
        """A training batch's fingerprint (what the bus checks): its sample indices'."""
        return fingerprint(indices)

    def test_fingerprint(self) -> int:
        """The test set's fingerprint: every index, in order."""
        return fingerprint(torch.arange(self.num_test))

    def _loader(self, which: str, reader: BatchReader, sampler: Sampler[list[int]]) -> DataLoader:
        """The split's one loader: made on first use, its workers kept alive across epochs and
        evaluations (each pass re-reads the sampler the caller has pointed at its steps)."""
        loader = self._loaders.get(which)
        if loader is None:
            pin = self.device.type == "cuda"
            loader = self._loaders[which] = make_loader(
                reader, sampler, self.workers, seed=(self.seed,), prefetch=self.prefetch,
                pin_memory=pin, persistent=True,
            )  # fmt: skip
        return loader

    def _to_device(self, batch: Batch) -> tuple[Tensor, Tensor]:
        x = batch.x.to(self.device, non_blocking=True)
        y = batch.y.to(self.device, non_blocking=True)
        return self.normalisation.apply(x, self._stats), y

    def epoch(
        self, epoch: int, first: int, stop: int
    ) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        """Steps `first`..`stop - 1` of `epoch`: (step in epoch, indices, x, y) on the device,
        x normalised and augmented from (seed, epoch, step)."""
        self._steps.epoch, self._steps.first, self._steps.stop = epoch, first, stop
        loader = self._loader("train", self.train, self._steps)
        for step, batch in enumerate(checked(loader), start=first):
            x, y = self._to_device(batch)
            if self.labels is not None:
                y = self.labels[batch.indices].to(self.device, non_blocking=True)
            x = augment_batch(
                x,
                seed=self.seed,
                epoch=epoch,
                step=step,
                crop_padding=self.crop_padding,
                flip=self.flip,
                rows=self.rows,
                batch_size=self.batch_size,
            )
            yield step, batch.indices, x, y

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The test split in order, `eval_batch_size` at a time: (x, y) on the device."""
        loader = self._loader("test", self.test, InOrder(self.num_test, self.eval_batch_size))
        for batch in checked(loader):
            yield self._to_device(batch)
            signal_point("evaluation")

    def close(self) -> None:
        """End the loaders' worker processes now (a run that ends or stops)."""
        close_loaders(self._loaders)


def close_loaders(loaders: dict[str, DataLoader]) -> None:
    """End `loaders`' worker processes now (a run that ends or stops), not whenever the
    interpreter collects them (at exit, torch leaves that to daemon-process clean-up)."""
    for loader in loaders.values():
        iterator = getattr(loader, "_iterator", None)  # persistent workers' iterator
        loader._iterator = None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    loaders.clear()
