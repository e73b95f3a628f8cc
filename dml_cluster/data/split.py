"""Seeded, stratified splits: a labelled/unlabelled mask (semi-supervised), a training subset."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dml_cluster.data.seeding import seeded_generator
from dml_cluster.errors import DataError

if TYPE_CHECKING:
    from dml_cluster.config import SubsetConfig


def labelled_mask(y: Tensor, fraction: float, seed: int) -> Tensor:
    """Bool mask keeping round(fraction * n_c) samples of each class c (at least one if > 0)."""
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"labelled fraction must be in [0, 1], got {fraction}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if fraction == 1.0:
        return torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    mask = torch.zeros(y.shape[0], dtype=torch.bool)
    if fraction == 0.0:
        return mask.to(y.device)
    labels = y.detach().cpu()
    g = seeded_generator("labelled_mask", seed)
    for cls in torch.unique(labels[labels >= 0]).tolist():
        members = torch.nonzero(labels == cls).flatten()
        keep = max(1, round(fraction * members.shape[0]))
        chosen = members[torch.randperm(members.shape[0], generator=g)[:keep]]
        mask[chosen] = True
    return mask.to(y.device)


def mask_labels(y: Tensor, mask: Tensor) -> Tensor:
    """A copy of `y` with every sample outside `mask` set to -1 (unlabelled)."""
    if mask.shape != y.shape or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor with the same shape as the labels")
    out = y.clone()
    out[~mask.to(y.device)] = -1
    return out


def subset_indices(
    y: Tensor, seed: int, *, per_class: int | None = None, fraction: float | None = None
) -> Tensor:
    """Sorted int64 indices of a seeded, stratified subset of a training set.

    Keeps `per_class` samples of each class, or round(fraction * n_c) (at least one) of each
    class c. Unlike `labelled_mask`, what is left out is dropped, not kept unlabelled. The
    choice depends only on the labels and `seed`, so every peer (every process) draws the same.
    """
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    labels = y.detach().cpu()
    g = seeded_generator("train_subset", seed)
    chosen = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        if per_class is not None:
            if per_class > members.shape[0]:
                raise DataError(
                    f"data.train_subset.per_class: {per_class} samples of class {cls} asked, "
                    f"the training set has {members.shape[0]}"
                )
            keep = per_class
        else:
            keep = max(1, round(fraction * members.shape[0]))
        chosen.append(members[torch.randperm(members.shape[0], generator=g)[:keep]])
    return torch.sort(torch.cat(chosen)).values


def training_subset(y: Tensor, subset: SubsetConfig | None, run_seed: int) -> Tensor | None:
    """The indices `data.train_subset` keeps (its seed, or the run's), or None for all."""
    if subset is None:
        return None
    seed = run_seed if subset.seed is None else subset.seed
    return subset_indices(y, seed, per_class=subset.per_class, fraction=subset.fraction)
