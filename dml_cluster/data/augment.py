"""Seeded, batched augmentation: identical on every peer for the same (seed, epoch, step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dml_cluster.data.seeding import seeded_generator


def augment_batch(
    x: Tensor,
    *,
    seed: int,
    epoch: int,
    step: int,
    crop_padding: int = 0,
    flip: bool = False,
    rows: slice | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Random zero-padded crop and horizontal flip, chosen per sample, of a [B, C, H, W] batch.

    All random draws come from a CPU generator seeded from (seed, epoch, step), so the result
    does not depend on the device or on the process. Returns `x` itself when nothing applies.
    `rows`: `x` is these rows of a step's batch of `batch_size` samples (a replica's share):
    the draws are made for the whole batch and each row takes its own, so a sample is augmented
    alike whichever replica reads it.
    """
    if x.ndim != 4:
        raise ValueError(f"augment_batch expects [B, C, H, W], got shape {tuple(x.shape)}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if crop_padding == 0 and not flip:
        return x
    b, c, h, w = x.shape
    p = crop_padding
    whole = b if batch_size is None else batch_size
    g = seeded_generator("augment", seed, epoch, step)
    off_y = torch.randint(0, 2 * p + 1, (whole,), generator=g)
    off_x = torch.randint(0, 2 * p + 1, (whole,), generator=g)
    flipped = torch.rand(whole, generator=g) < 0.5 if flip else torch.zeros(whole, dtype=torch.bool)
    if rows is not None:
        off_y, off_x, flipped = off_y[rows], off_x[rows], flipped[rows]

    # the draws go to the device without waiting for it (a blocking copy syncs every step)
    on = x.device
    off_y, off_x = off_y.to(on, non_blocking=True), off_x.to(on, non_blocking=True)
    flipped = flipped.to(on, non_blocking=True)
    rows = off_y[:, None] + torch.arange(h, device=on)  # [B, H] rows of the padded image
    cols = off_x[:, None] + torch.arange(w, device=on)  # [B, W] columns of the padded image
    cols = torch.where(flipped[:, None], cols.flip(1), cols)

    padded = F.pad(x, (p, p, p, p)) if p else x
    rows = rows[:, None, :, None].expand(b, c, h, w + 2 * p)
    cols = cols[:, None, None, :].expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)
