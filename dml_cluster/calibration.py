"""Calibration of a classifier's posteriors: test NLL and expected calibration error (ECE)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

ECE_BINS = 15
"""Equal-width confidence bins of the ECE (Guo et al. 2017 use 15)."""


def nll(log_p: Tensor, y: Tensor) -> float:
    """Mean negative log-likelihood of the labels, in nats."""
    # deterministic: [B, C] inputs: nll_loss's 1-D-target CUDA kernels reduce in one block
    return F.nll_loss(log_p, y.to(log_p.device)).item()


def expected_calibration_error(log_p: Tensor, y: Tensor, bins: int = ECE_BINS) -> float:
    """sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|, B_b the samples whose top
    probability falls in bin b of `bins` equal-width bins of (0, 1]."""
    confidence, predicted = log_p.exp().max(dim=1)
    correct = (predicted == y.to(log_p.device)).to(confidence.dtype)
    which = (confidence * bins).ceil().clamp(1, bins).long() - 1  # (0, 1/b] -> bin 0
    members = F.one_hot(which, bins).to(confidence.dtype)  # sums, not scatter: deterministic
    gap = (members * (confidence - correct)[:, None]).sum(dim=0)
    return (gap.abs().sum() / max(len(y), 1)).item()
