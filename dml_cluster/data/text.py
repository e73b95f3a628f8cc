"""Text data for language models: local files tokenized once into a cached token file, and
the training and validation windows read from it.

`data.name: text` with `data.train` and `data.val` (a path, a glob, or a list of them; nothing
is downloaded). A split's files, in sorted order of each pattern (empty ones a glob matches
skipped), are joined with the tokenizer's end-of-text id between them and after the last one,
and tokenized once into `<data.cache_dir>/<key>.tokens`: the ids as little-endian uint16 (a
vocabulary of at most 65,536 ids) or uint32, plus `<key>.json` describing them. The cache folder
lies under the output directory (default `<run.out_dir>/.cache/tokens`), never beside the data,
which may be read-only. The key hashes the split's file paths, sizes and content hashes and the
tokenizer's identity, so a changed file or tokenizer is tokenized again and an unchanged one
never is. One process writes a token file (an exclusive lock on `<key>.lock`; the others wait,
then read it), atomically (`run_folder.write_atomic`): a reader never sees half of one.

Training windows: a split of N tokens holds `n = (N - T) // T` windows of `T = data.block_size`
tokens (x = tokens[s : s + T], y = tokens[s + 1 : s + T + 1]) on a grid of stride T whose
offset (0 <= offset < T) is drawn from (seed, epoch): an epoch reads every token about once,
and different epochs cut the text at different places. A window start is a "sample": the
epoch's order of windows is `sampler.epoch_order(n, seed, epoch)`, the batch of a step is
`sampler.batch_indices`, exactly as for image batches, so every peer reads the same windows and
a run resumed at any step reads what it would have read. Windows are read from a read-only
`np.memmap` of the token file: the file is shared through the page cache, never copied into
every process, and a pickled `TokenWindows` (a DataLoader worker's copy) carries only the path.

Validation reads the first `min(data.val_tokens, N - 1) // T` consecutive non-overlapping
windows of the validation split (at most `data.val_tokens` predicted positions).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from dml_cluster.data.sampler import batch_indices, epoch_order, shard_rows
from dml_cluster.data.seeding import derive_seed
from dml_cluster.data.tokenizers import Tokenizer, check_text_file, load_tokenizer
from dml_cluster.errors import ConfigError, DataError
from dml_cluster.run_folder import write_atomic, write_json_atomic

DEFAULT_VAL_TOKENS = 65_536
CACHE_SUBDIR = Path(".cache") / "tokens"
"""The default cache folder, under `run.out_dir`."""
_FORMAT = 1  # the token file layout's version; part of the cache key


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536), else uint32; little-endian."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def resolve_files(patterns: str | Sequence[str], split: str) -> list[Path]:
    """The files of a split: each pattern a path or a glob (sorted matches), in the given order.
    Empty files a glob matches are skipped (a corpus may hold some); a pattern matching nothing,
    or only empty files, is a one-line DataError, and so is an empty file named as such."""
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    if not items:
        raise DataError(f"data.{split}: no files given")
    files: list[Path] = []
    for pattern in items:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise DataError(f"data.{split}: {pattern}: matches no file")
            matches = [m for m in matches if os.path.getsize(m) > 0]  # (empty __init__.py)
            if not matches:
                raise DataError(f"data.{split}: {pattern}: matches only empty files")
            files += [Path(m) for m in matches]
        else:
            files.append(Path(expanded))
    return files


@dataclass(frozen=True)
class TokenFile:
    """A tokenized split on disk: `num_tokens` ids of `dtype` in `path`."""

    path: Path
    dtype: np.dtype
    num_tokens: int
    vocab_size: int
    eot_id: int
    content: str
    """A hash of what the ids are made of (the tokenizer's identity, every file's size and
    content hash, in order; not where the files lie): equal on every peer that reads the same
    text with the same tokenizer, whatever its paths."""

    def open(self) -> np.memmap:
        """The ids, memory-mapped read-only (shared through the page cache)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


def cache_key(files: Sequence[Path], tokenizer: Tokenizer) -> tuple[str, list[dict[str, Any]]]:
    """The cache key of a split (hex) and the file facts it hashes: resolved path, size and the
    SHA-256 of the content of every file (in order), and the tokenizer's identity. Reads every
    file; a missing, empty or non-UTF-8 one is a one-line DataError."""
    facts = []
    for path in files:
        data = check_text_file(path)
        facts.append(
            {
                "path": str(path.resolve()),
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    ident = {"format": _FORMAT, "tokenizer": tokenizer.identity, "files": facts}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    return key, facts


def content_hash(facts: Sequence[dict[str, Any]], tokenizer: Tokenizer) -> str:
    """The hash of a split's ids by what they are made of (`TokenFile.content`): the cache key's
    facts without the paths."""
    ident = {
        "format": _FORMAT,
        "tokenizer": tokenizer.identity,
        "files": [(f["size"], f["sha256"]) for f in facts],
    }
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def _read_meta(meta_path: Path, tokens_path: Path) -> dict[str, Any] | None:
    """The description of a complete cached token file, or None if there is none (or it does
    not match the token file's size)."""
    try:
        meta = json.loads(meta_path.read_text())
        size = tokens_path.stat().st_size
    except (OSError, ValueError):
        return None
    expected = int(meta.get("num_tokens", -1)) * np.dtype(meta.get("dtype", "<u2")).itemsize
    return meta if size == expected and meta.get("format") == _FORMAT else None


def _tokenize(files: Sequence[Path], tokenizer: Tokenizer, dtype: np.dtype) -> np.ndarray:
    """Every file's ids followed by end-of-text, concatenated, as `dtype`."""
    parts = []
    eot = np.asarray([tokenizer.eot_id], dtype=dtype)
    for path in files:
        text = check_text_file(path).decode("utf-8")
        ids = tokenizer.encode(text)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise DataError(f"text data {path}: the tokenizer gave ids outside its vocabulary")
        parts += [ids.astype(dtype), eot]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `lock_path` (blocks until the holder releases it)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass(frozen=True)
class SplitPlan:
    """A split's files, checked (present, non-empty, UTF-8) and hashed: what to tokenize."""

    split: str
    files: list[Path]
    key: str
    facts: list[dict[str, Any]]


def plan_split(patterns: str | Sequence[str], split: str, tokenizer: Tokenizer) -> SplitPlan:
    """Resolve and check a split's files and compute its cache key; writes nothing."""
    files = resolve_files(patterns, split)
    key, facts = cache_key(files, tokenizer)
    return SplitPlan(split, files, key, facts)


def tokenize_split(
    patterns: str | Sequence[str] | SplitPlan, split: str, tokenizer: Tokenizer, cache_dir: Path
) -> TokenFile:
    """The cached token file of a split, written first if no valid one is there (by one process:
    the others wait on the lock and then find it). `patterns`: the split's files, or their
    `plan_split`."""
    plan = patterns if isinstance(patterns, SplitPlan) else plan_split(patterns, split, tokenizer)
    files, key, facts = plan.files, plan.key, plan.facts
    dtype = token_dtype(tokenizer.vocab_size)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.cache_dir: cannot create {cache_dir} ({err.strerror})") from None
    tokens_path, meta_path = cache_dir / f"{key}.tokens", cache_dir / f"{key}.json"
    meta = _read_meta(meta_path, tokens_path)
    if meta is None:
        with _exclusive(cache_dir / f"{key}.lock"):
            meta = _read_meta(meta_path, tokens_path)  # written while we waited?
            if meta is None:
                ids = _tokenize(files, tokenizer, dtype)
                write_atomic(tokens_path, memoryview(ids).cast("B"))
                meta = {
                    "format": _FORMAT,
                    "split": split,
                    "dtype": dtype.str,
                    "num_tokens": int(ids.shape[0]),
                    "vocab_size": tokenizer.vocab_size,
                    "eot_id": tokenizer.eot_id,
                    "tokenizer": tokenizer.identity,
                    "files": facts,
                }
                write_json_atomic(meta_path, meta)  # last: its presence marks the file complete
    return TokenFile(
        tokens_path, np.dtype(meta["dtype"]), int(meta["num_tokens"]), tokenizer.vocab_size,
        tokenizer.eot_id, content_hash(facts, tokenizer),
    )  # fmt: skip


# -- windows -----------------------------------------------------------------------------------


def num_windows(num_tokens: int, block_size: int) -> int:
    """Training windows per epoch: (N - T) // T, the same for every epoch's offset."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return max(num_tokens - block_size, 0) // block_size


def epoch_offset(seed: int, epoch: int, block_size: int) -> int:
    """Where epoch `epoch`'s grid of windows starts: 0 <= offset < block_size."""
    return derive_seed("text_offset", seed, epoch) % block_size


def window_starts(
    num_tokens: int, block_size: int, batch_size: int, seed: int, epoch: int, step: int
) -> Tensor:
    """The int64 start positions of the windows of `step` in `epoch` (a pure function of its
    arguments: every peer, and a resumed run, gets the same ones)."""
    n = num_windows(num_tokens, block_size)
    order = epoch_order(n, seed, epoch)
    return (
        epoch_offset(seed, epoch, block_size) + batch_indices(order, step, batch_size) * block_size
    )


class WindowSampler(Sampler[list[int]]):
    """The window starts of steps `first`..`stop - 1` of `epoch`, one list per step: what the
    loader's `StepSampler` is for image batches (same order, same resume rule), for
    `TokenWindows.__getitems__`. `shard` (r, D): replica r of a peer of D replicas reads the
    r-th of D equal slices of each step's windows (`StepSampler`'s rule)."""

    def __init__(
        self, num_tokens: int, block_size: int, batch_size: int, seed: int, epoch: int,
        first: int, stop: int, shard: tuple[int, int] = (0, 1),
    ) -> None:  # fmt: skip
        self.num_tokens, self.block_size, self.batch_size = num_tokens, block_size, batch_size
        self.seed, self.epoch, self.first, self.stop = seed, epoch, first, stop
        self.rows = shard_rows(batch_size, shard)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(num_windows(self.num_tokens, self.block_size), self.seed, self.epoch)
        offset = epoch_offset(self.seed, self.epoch, self.block_size)
        for step in range(self.first, self.stop):
            idx = batch_indices(order, step, self.batch_size)[self.rows]
            yield (offset + idx * self.block_size).tolist()

    def __len__(self) -> int:
        return max(self.stop - self.first, 0)


def val_starts(num_tokens: int, block_size: int, val_tokens: int) -> Tensor:
    """The starts of the validation windows: consecutive, non-overlapping, from position 0,
    covering at most `val_tokens` predicted positions."""
    count = min(val_tokens, max(num_tokens - 1, 0)) // block_size
    return torch.arange(count, dtype=torch.int64) * block_size


class TokenWindows(TorchDataset):
    """Windows of a token file, read by their start positions: `read(starts)` -> (x, y), int64
    [B, T] each. The memory map is opened lazily in the process that reads (pickling carries
    only the file's description)."""

    def __init__(self, tokens: TokenFile, block_size: int) -> None:
        if tokens.num_tokens < block_size + 1:
            raise DataError(
                f"text data: {tokens.num_tokens} tokens cannot fill one window of "
                f"data.block_size {block_size} (+1 for the targets)"
            )
        self.tokens, self.block_size = tokens, block_size
        self._map: np.memmap | None = None
        self._offsets = np.arange(block_size + 1, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}

    def __len__(self) -> int:
        return self.tokens.num_tokens - self.block_size  # valid start positions

    def read(self, starts: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        if self._map is None:
            self._map = self.tokens.open()
        s = np.asarray(starts, dtype=np.int64)
        if s.size and (s.min() < 0 or s.max() >= len(self)):
            raise IndexError(f"window start outside 0..{len(self) - 1}")
        rows = torch.from_numpy(self._map[s[:, None] + self._offsets].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def __getitem__(self, start: int) -> tuple[Tensor, Tensor]:
        x, y = self.read([start])
        return x[0], y[0]

    def __getitems__(self, starts: list[int]) -> tuple[Tensor, Tensor]:
        return self.read(starts)


@dataclass(frozen=True)
class TextData:
    """Both splits of a text dataset, tokenized, with the tokenizer and the window sizes."""

    tokenizer: Tokenizer
    train: TokenWindows
    val: TokenWindows
    block_size: int
    val_tokens: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def input_shape(self) -> tuple[int]:
        """What `models.build_model` takes for a token model: (block_size,)."""
        return (self.block_size,)

    @property
    def num_classes(self) -> int:
        """The classes of every position's prediction: the vocabulary."""
        return self.tokenizer.vocab_size

    def record(self) -> dict[str, Any]:
        """What the run folder's `data.json` holds for text: the splits' token files."""
        splits = {"train": self.train.tokens, "val": self.val.tokens}
        return {
            "dataset": "text",
            "tokenizer": self.tokenizer.identity,
            "vocab_size": self.vocab_size,
            "eot_id": self.tokenizer.eot_id,
            "block_size": self.block_size,
            "val_tokens": self.val_tokens,
            "splits": {
                name: {"tokens": t.num_tokens, "content": t.content, "file": str(t.path)}
                for name, t in splits.items()
            },
        }

    def steps_per_epoch(self, batch_size: int) -> int:
        return num_windows(self.train.tokens.num_tokens, self.block_size) // batch_size

    def train_batch(
        self, batch_size: int, seed: int, epoch: int, step: int
    ) -> tuple[Tensor, Tensor]:
        """(x, y) of training step `step` of `epoch`, int64 [B, T] each."""
        n = self.train.tokens.num_tokens
        return self.train.read(window_starts(n, self.block_size, batch_size, seed, epoch, step))

    def val_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The validation windows in order, `batch_size` windows at a time."""
        starts = val_starts(self.val.tokens.num_tokens, self.block_size, self.val_tokens)
        for i in range(0, starts.shape[0], batch_size):
            yield self.val.read(starts[i : i + batch_size])


def default_cache_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CACHE_SUBDIR


def load_text(
    train: str | Sequence[str] | None,
    val: str | Sequence[str] | None,
    *,
    block_size: int | None,
    tokenizer: str | None = None,
    cache_dir: str | Path,
    val_tokens: int | None = None,
) -> TextData:
    """Tokenize (or find cached) both splits and wrap them in windows of `block_size`."""
    if train is None or val is None:
        missing = "data.train" if train is None else "data.val"
        raise ConfigError(f"config error: {missing}: text data needs it (a path or a glob)")
    if block_size is None:
        raise ConfigError("config error: data.block_size: text data needs it (tokens per window)")
    val_tokens = DEFAULT_VAL_TOKENS if val_tokens is None else val_tokens
    if val_tokens < block_size:
        raise ConfigError(
            f"config error: data.val_tokens: {val_tokens} positions hold no validation window of "
            f"data.block_size {block_size}"
        )
    tok = load_tokenizer(tokenizer)
    cache = Path(cache_dir)
    plans = plan_split(train, "train", tok), plan_split(val, "val", tok)  # both checked first
    train_tokens = tokenize_split(plans[0], "train", tok, cache)
    val_tokens_file = tokenize_split(plans[1], "val", tok, cache)
    windows = TokenWindows(train_tokens, block_size)
    if num_windows(train_tokens.num_tokens, block_size) < 1:
        raise DataError(
            f"data.train: {train_tokens.num_tokens} tokens hold no training window of "
            f"data.block_size {block_size}"
        )
    val_windows = TokenWindows(val_tokens_file, block_size)
    return TextData(tok, windows, val_windows, block_size, val_tokens)


def load_text_config(data: Any, out_dir: str | Path) -> TextData:
    """`load_text` of a `DataConfig` (cache folder: data.cache_dir, else under `out_dir`)."""
    return load_text(
        data.train,
        data.val,
        block_size=data.block_size,
        tokenizer=data.tokenizer,
        cache_dir=data.cache_dir or default_cache_dir(out_dir),
        val_tokens=data.val_tokens,
    )
