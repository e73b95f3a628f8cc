"""Decoupled knowledge distillation (Zhao et al., CVPR 2022) from the cohort's teacher peers.

L = CE + min((epoch + 1) / warmup, 1) * mean over teachers of (alpha TCKD + beta NCKD)
    [+ peer_weight * DML(fellow students)]

TCKD / NCKD are in `losses.dkd_parts`. Defaults are mdistiller's: alpha 1, beta 8, T 4, warm-up
20 epochs, counted in whole epochs from 1 as mdistiller does. DKD needs the label, so it is
computed on labelled samples only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dml_cluster import losses
from dml_cluster.method_config.dkd import DKDConfig
from dml_cluster.methods.base import LossParts, Method, Progress, StepView, dense
from dml_cluster.methods.kd import with_peers


def warmup_factor(progress: Progress, warmup_epochs: int) -> float:
    """Linear warm-up of the distillation term: (epoch + 1) / warmup, capped at 1."""
    if warmup_epochs == 0:
        return 1.0
    return min((progress.epoch + 1) / warmup_epochs, 1.0)


class DecoupledKD(Method):
    def __init__(self, cfg: DKDConfig) -> None:
        super().__init__(cfg)
        self.alpha, self.beta, self.temperature = cfg.alpha, cfg.beta, cfg.temperature
        self.warmup_epochs, self.peer_weight = cfg.warmup_epochs, cfg.peer_weight

    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        ce = losses.cross_entropy(logits, target, view.labelled)
        # labelled samples only, without a host read of the labels: every row is computed (an
        # unlabelled one against class 0) and weighted 0 or 1 in the mean (0 when none is)
        rows = (target != losses.UNLABELLED).float()
        safe = target.clamp(min=0)
        per_teacher = [
            losses.dkd_parts(logits, t, safe, self.temperature, reduction="none")
            for t in dense(view.teachers)
        ]
        count = rows.sum().clamp(min=1.0) if view.labelled is None else view.labelled
        count = torch.where(count > 0, count, torch.ones_like(count))
        tckd = torch.stack([(s[0] * rows).sum() / count for s in per_teacher]).mean()
        nckd = torch.stack([(s[1] * rows).sum() / count for s in per_teacher]).mean()
        dkd = warmup_factor(view.progress, self.warmup_epochs) * (
            self.alpha * tckd + self.beta * nckd
        )
        total = with_peers(ce + dkd, logits, target, view, self.peer_weight)
        return LossParts(total, ce, dkd)
