"""Hinton knowledge distillation (arXiv 1503.02531) from the cohort's teacher peers.

L = (1 - a) CE(y, p_s) + a * mean over teachers of T^2 KL(p_t^T || p_s^T)
    [+ peer_weight * DML(fellow students), the "teacher + DML" combination]

a is `kd_weight` (default 0.9, T default 4: mdistiller's KD recipe). The KD term covers every
sample, labelled or not; CE only the labelled ones. With several teachers each gets an equal
share. DML links to fellow students use T = 1 (as in `dml`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dml_cluster import losses, losses_sparse
from dml_cluster.method_config.kd import KDConfig
from dml_cluster.methods.base import LossParts, Method, StepView, dense, sparse
from dml_cluster.methods.dml import mutual_term
from dml_cluster.sparse_rows import Rows


def distill_from(logits: Tensor, teachers: list[Tensor | Rows], temperature: float) -> Tensor:
    """Mean over teachers of the KD loss (on the sent support for sparse teachers)."""
    return torch.stack([
        losses.kd_loss(logits, t, temperature) if isinstance(t, Tensor)
        else losses_sparse.kd_loss(logits, t, temperature)
        for t in teachers
    ]).mean()  # fmt: skip


def with_peers(
    total: Tensor, logits: Tensor, target: Tensor, view: StepView, weight: float
) -> Tensor:
    """Add DML towards fellow students (T = 1, every sample) when `weight` > 0."""
    if weight == 0.0:
        return total
    rows = sparse(view.peers)
    if rows is None:
        term = mutual_term(losses.mutual_kl, logits, target, dense(view.peers), 1.0, True)
    else:
        term = mutual_term(losses_sparse.mutual_kl, logits, target, rows, 1.0, True)
    return total if term is None else total + weight * term


class KnowledgeDistillation(Method):
    def __init__(self, cfg: KDConfig) -> None:
        super().__init__(cfg)
        self.a, self.temperature = cfg.kd_weight, cfg.temperature
        self.peer_weight = cfg.peer_weight

    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        ce = losses.cross_entropy(logits, target, view.labelled)
        kd = distill_from(logits, sparse(view.teachers) or dense(view.teachers), self.temperature)
        total = with_peers((1 - self.a) * ce + self.a * kd, logits, target, view, self.peer_weight)
        return LossParts(total, ce, kd)
