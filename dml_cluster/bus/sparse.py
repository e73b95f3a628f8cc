"""Top-k rows: each row's k most likely classes as (index, log-probability) pairs, the rest of
its mass spread evenly over the other C - k classes (the receiver recovers it from the kept
values: 1 - sum(exp(values))). Tensors only; the wire format and the losses read these.

Indices take the smallest integer dtype that holds every class index; values the configured
float dtype (bfloat16 by default). Decoding widens both (int64, float32), exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def index_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds every index of `num_classes` classes."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if num_classes <= 1 << 8:
        return torch.uint8
    if num_classes <= 1 << 15:
        return torch.int16
    return torch.int32


def check_k(k: int, num_classes: int) -> None:
    """`k` is a usable top-k size for `num_classes` classes (one line if not)."""
    if not 0 < k <= num_classes:
        raise ValueError(f"bus.k must be in 1..{num_classes} (the number of classes), got {k}")


@dataclass(frozen=True)
class TopK:
    """Top-k rows: `indices` and `values` [rows, k] (log-probabilities), of `num_classes`."""

    indices: Tensor
    values: Tensor
    num_classes: int

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str) -> TopK:
        """The rows on `device` (devices.on_one_device moves them as it moves tensors)."""
        return TopK(self.indices.to(device), self.values.to(device), self.num_classes)

    def widened(self) -> TopK:
        """int64 indices and float32 values, as a receiver reads them (exact)."""
        return TopK(self.indices.long(), self.values.float(), self.num_classes)

    def residual(self) -> Tensor:
        """[rows] the mass not kept (>= 0), spread evenly over the other C - k classes; 0 when
        k = C."""
        if self.k == self.num_classes:
            return self.values.new_zeros(self.values.shape[0], dtype=torch.float32)
        return (1.0 - self.values.float().exp().sum(dim=1)).clamp(min=0.0)


def encode_topk(log_p: Tensor, k: int, dtype: torch.dtype = torch.bfloat16) -> TopK:
    """The top-k rows of [rows, C] log-probabilities `log_p` (detached), values in `dtype`."""
    num_classes = log_p.shape[1]
    check_k(k, num_classes)
    values, indices = log_p.detach().topk(k, dim=1, sorted=True)
    return TopK(indices.to(index_dtype(num_classes)), values.to(dtype), num_classes)


def densify(rows: TopK) -> Tensor:
    """The [rows, C] log-probabilities `rows` stand for (the residual spread evenly; a row that
    kept all its mass gives the others the smallest normal float): what evaluation and batch
    statistics score; the losses read the sparse support directly."""
    rows = rows.widened()
    n, c = rows.values.shape[0], rows.num_classes
    rest = c - rows.k
    tiny = torch.finfo(torch.float32).tiny  # a row that kept all its mass: ~0, not log 0
    spread = (rows.residual() / max(rest, 1)).clamp(min=tiny)
    fill = spread.log() if rest else rows.values.new_zeros(n)
    dense = fill[:, None].expand(n, c).clone()
    return dense.scatter_(1, rows.indices, rows.values)
