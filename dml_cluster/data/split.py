"""Seeded, stratified labelled/unlabelled split for semi-supervised runs."""

from __future__ import annotations

import torch
from torch import Tensor

from dml_cluster.data.seeding import seeded_generator
from dml_cluster.errors import DataError


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
