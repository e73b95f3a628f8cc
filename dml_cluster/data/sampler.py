"""The shared batch order: every peer derives the same permutation from (seed, epoch)."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from dml_cluster.data.seeding import seeded_generator


def epoch_order(num_samples: int, seed: int, epoch: int) -> Tensor:
    """The int64 permutation of range(num_samples) that every peer uses in `epoch`."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    g = seeded_generator("epoch_order", seed, epoch)
    return torch.randperm(num_samples, generator=g, dtype=torch.int64)


def steps_per_epoch(num_samples: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches in one epoch; with `drop_last` a final partial batch is skipped."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if drop_last:
        return num_samples // batch_size
    return -(-num_samples // batch_size)


def batch_indices(order: Tensor, step: int, batch_size: int) -> Tensor:
    """The sample indices of batch `step` of an epoch order (the last batch may be shorter)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    start = step * batch_size
    if step < 0 or start >= order.shape[0]:
        raise IndexError(f"step {step} is outside an epoch of {order.shape[0]} samples")
    return order[start : start + batch_size]


def shard_rows(batch_size: int, shard: tuple[int, int]) -> slice:
    """The rows of a step's batch that replica r of D reads: the r-th of D equal slices."""
    r, d = shard
    if not 0 <= r < d or batch_size % d:
        raise ValueError(f"replica {r} of {d} cannot read an equal share of {batch_size} samples")
    per = batch_size // d
    return slice(r * per, (r + 1) * per)


def fingerprint(indices: Tensor) -> int:
    """Unsigned 64-bit blake2b fingerprint of an index sequence (int64 little-endian bytes)."""
    data = indices.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    digest = hashlib.blake2b(data.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
