"""The data path of a language-model cohort: what `loader.DataPath` is for images, for windows of
a token file (`text.TextData`).

Training step `s` of `epoch` reads the windows `text.WindowSampler` gives it: a pure function of
(seed, epoch, step), so every peer reads the same windows and a run resumed mid-epoch reads what
it would have read. The windows are read from the token file's memory map (in this process, or
by `data.workers` loader processes that each open the map themselves), copied to the device as
int64 ids x [B, T] and next tokens y; y travels flattened to [B·T], one target per position, as
the cohort's losses, exchange and evaluation see a language model's predictions: one row per
position (`models.as_rows`). Windows never pad: every position is a real token.

A batch's fingerprint (what the bus checks on every message) covers the windows' starts and the
token file's content hash: peers that tokenized different text, or with another tokenizer, stop
at their first exchange instead of training on different data.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from dml_cluster.data.loader import Batch, close_loaders, make_loader
from dml_cluster.data.sampler import fingerprint
from dml_cluster.data.text import TextData, TokenWindows, WindowSampler, num_windows, val_starts


class _InOrder(Sampler[list[int]]):
    """The validation windows' starts, `batch_size` windows at a time."""

    def __init__(self, starts: Tensor, batch_size: int) -> None:
        self.starts, self.batch_size = starts, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, self.starts.shape[0], self.batch_size):
            yield self.starts[i : i + self.batch_size].tolist()

    def __len__(self) -> int:
        return -(-self.starts.shape[0] // self.batch_size)


class _Reader(TokenWindows):
    """Token windows read a batch per call, as the loader's `Batch` (starts, x, y)."""

    def __getitems__(self, starts: list[int]) -> Batch:  # type: ignore[override]
        x, y = self.read(starts)
        return Batch(torch.as_tensor(starts, dtype=torch.int64), x, y)


def _reader(windows: TokenWindows) -> _Reader:
    return _Reader(windows.tokens, windows.block_size)


def _content_key(content: str) -> Tensor:
    """A token file's content hash as int64 words (mixed into batch fingerprints)."""
    raw = bytes.fromhex(content)[:16]
    return torch.frombuffer(bytearray(raw), dtype=torch.int64).clone()


class TextPath:
    """A peer process's token windows: training steps from (seed, epoch), validation in order.
    `shard` (r, D): this process is replica r of a peer of D replicas and reads the r-th slice
    of each step's windows (the whole batch's windows, in D equal shares)."""

    labels: Tensor | None = None
    """Every position's target is its next token: none is unlabelled (as `DataPath.labels`)."""

    def __init__(
        self,
        text: TextData,
        device: torch.device,
        *,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        workers: int,
        prefetch: int,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.text, self.device = text, device
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.workers, self.prefetch = workers, prefetch
        self.block_size = text.block_size
        self.train, self.val = _reader(text.train), _reader(text.val)
        n = text.train.tokens.num_tokens
        self._steps = WindowSampler(n, self.block_size, batch_size, seed, 0, 0, 0, shard)
        self._val_starts = val_starts(text.val.tokens.num_tokens, self.block_size, text.val_tokens)
        self._in_order = _InOrder(self._val_starts, eval_batch_size)
        self._train_key = _content_key(text.train.tokens.content)
        self._val_key = _content_key(text.val.tokens.content)
        self._loaders: dict[str, DataLoader] = {}

    @property
    def num_train(self) -> int:
        """Training windows per epoch (an epoch's "samples")."""
        return num_windows(self.text.train.tokens.num_tokens, self.block_size)

    @property
    def num_test(self) -> int:
        """Validation windows."""
        return int(self._val_starts.shape[0])

    def fingerprint(self, starts: Tensor) -> int:
        """A training batch's fingerprint: its windows' starts and the training text's hash."""
        return fingerprint(torch.cat([self._train_key, starts.to("cpu", torch.int64)]))

    def test_fingerprint(self) -> int:
        """The validation set's fingerprint: its windows and the validation text's hash."""
        return fingerprint(torch.cat([self._val_key, self._val_starts]))

    def _loader(self, which: str, reader: _Reader, sampler: Sampler[list[int]]) -> DataLoader:
        loader = self._loaders.get(which)
        if loader is None:
            pin = self.device.type == "cuda"
            loader = self._loaders[which] = make_loader(
                reader, sampler, self.workers, seed=(self.seed,), prefetch=self.prefetch,  # type: ignore[arg-type]
                pin_memory=pin, persistent=True,
            )  # fmt: skip
        return loader

    def close(self) -> None:
        """End the loaders' worker processes now (a run that ends or stops)."""
        close_loaders(self._loaders)

    def _to_device(self, batch: Batch) -> tuple[Tensor, Tensor]:
        x = batch.x.to(self.device, non_blocking=True)
        return x, batch.y.reshape(-1).to(self.device, non_blocking=True)

    def epoch(
        self, epoch: int, first: int, stop: int
    ) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        """Steps `first`..`stop - 1` of `epoch`: (step in epoch, window starts [B], ids x [B, T],
        next tokens y [B·T]) on the device."""
        self._steps.epoch, self._steps.first, self._steps.stop = epoch, first, stop
        loader = self._loader("train", self.train, self._steps)
        for step, batch in enumerate(loader, start=first):
            x, y = self._to_device(batch)
            yield step, batch.indices, x, y

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The validation windows in order, `eval_batch_size` at a time: (x [B, T], y [B·T])."""
        for batch in self._loader("test", self.val, self._in_order):
            yield self._to_device(batch)
