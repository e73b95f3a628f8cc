"""Losses against sparse targets, computed on the sent support: no dense [rows, C] target.

For a top-k target p (kept log-probabilities v_i at indices i, residual mass r spread evenly
over the m = C - k other classes) and a receiver's log-probabilities log q [rows, C]:

    KL(p || q) = sum_topk p_i (v_i - log q_i) + r log(r / m) - (r / m) sum_rest log q_j,

with sum_rest log q_j = sum_all log q - sum_topk log q (zero terms where r = 0 or m = 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dml_cluster.bus.sparse import TopK


def topk_kl_rows(target: TopK, log_q: Tensor) -> Tensor:
    """[rows] KL(target || q) for a top-k target and dense receiver log-probabilities."""
    target = target.widened()
    kept = log_q.gather(1, target.indices)  # log q at the sent indices
    p = target.values.exp()
    total = (p * (target.values - kept)).sum(dim=1)
    rest = target.num_classes - target.k
    if rest == 0:
        return total
    r = target.residual()
    rest_log_q = log_q.sum(dim=1) - kept.sum(dim=1)
    spread = r / rest
    # r log(r / m), taken as 0 where r = 0 (its limit)
    mass = torch.where(r > 0, r * torch.log(spread.clamp(min=torch.finfo(r.dtype).tiny)), 0.0)
    return total + mass - spread * rest_log_q


def topk_kl(target: TopK, log_q: Tensor, rows: Tensor | None = None) -> Tensor:
    """KL(target || q): summed over classes, averaged over rows (or the `rows` mask's rows),
    as losses.kl_div reduces the dense one (0 when no row is marked)."""
    per_row = topk_kl_rows(target, log_q)
    if rows is None:
        return per_row.mean()
    return per_row.masked_fill(~rows, 0.0).sum() / rows.sum().clamp(min=1)
