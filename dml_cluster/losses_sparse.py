"""Losses against sparse targets, computed on the sent support: no dense [rows, C] target.

A sparse target is `Support`: per row, log-probabilities at some class indices (each index
counted with a weight, 1 unless the support lists it more than once) and one probability rho
shared by each of the n_rest classes not listed. Its KL to a receiver's log q [rows, C]:

    KL(p || q) = sum_S w_i p_i (log p_i - log q_i) + n_rest rho log rho - rho sum_rest log q_j,

with sum_rest log q_j = sum_all log q - sum_S w_i log q_i (rest terms 0 where rho = 0). A top-k
target (kept log-probabilities v_i, residual mass r spread over m = C - k classes) is the case
w = 1, rho = r / m, n_rest = m. Tempering (p^(1/T), renormalised) and DML_e's probability
ensemble (the mean of the members' probabilities) keep this form, so both stay sparse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dml_cluster.bus.sparse import TopK


@dataclass(frozen=True)
class Support:
    """A sparse distribution over `num_classes` classes (see the module's docstring)."""

    indices: Tensor  # [rows, n] int64
    log_p: Tensor  # [rows, n] float32
    weight: Tensor | None  # [rows, n] or None (every weight 1)
    rest_log_p: Tensor  # [rows] log rho (-inf: nothing outside the support)
    rest_n: Tensor  # [rows] float32: classes outside the support
    num_classes: int


def from_topk(rows: TopK) -> Support:
    """Top-k rows as a `Support`: the residual spread evenly over the other C - k classes."""
    rows = rows.widened()
    n = rows.values.shape[0]
    rest = rows.num_classes - rows.k
    if rest == 0:
        rest_log_p = torch.full((n,), -math.inf, device=rows.values.device)
    else:
        rest_log_p = (rows.residual() / rest).log()  # log 0 = -inf where no mass is left
    rest_n = torch.full((n,), float(rest), device=rows.values.device)
    return Support(rows.indices, rows.values, None, rest_log_p, rest_n, rows.num_classes)


def tempered(target: Support, temperature: float) -> Support:
    """p^(1/T), renormalised (as losses.tempered does to a dense target)."""
    if temperature == 1.0:
        return target
    kept = target.log_p / temperature
    rest = target.rest_log_p / temperature
    terms = [kept if target.weight is None else kept + target.weight.log()]
    with_rest = torch.where(target.rest_n > 0, rest + target.rest_n.clamp(min=1).log(), -math.inf)
    log_z = torch.logsumexp(torch.cat([*terms, with_rest[:, None]], dim=1), dim=1)
    return Support(
        target.indices, kept - log_z[:, None], target.weight, rest - log_z, target.rest_n,
        target.num_classes,
    )  # fmt: skip


def ensemble(members: Sequence[Support]) -> Support:
    """The mean of the members' probabilities (DML_e's `ensemble: probs`), itself sparse: on
    the union of their supports, each member contributes its kept probability where it kept
    the class and its rho elsewhere; outside the union, the mean of the rhos."""
    if len(members) == 1:
        return members[0]
    indices = torch.cat([m.indices for m in members], dim=1)
    prob = torch.zeros(indices.shape, device=indices.device)
    listed = torch.zeros(indices.shape, device=indices.device)
    for m in members:
        hit = indices[:, :, None] == m.indices[:, None, :]  # [rows, n_all, n_m]
        found = hit.any(dim=2)
        kept = (hit * m.log_p.exp()[:, None, :]).sum(dim=2)
        prob += torch.where(found, kept, m.rest_log_p.exp()[:, None])
        listed += found
    prob /= len(members)
    weight = 1.0 / listed  # an index in several members' supports is listed that many times
    rest_p = torch.stack([m.rest_log_p.exp() for m in members]).mean(dim=0)
    rest_n = members[0].num_classes - weight.sum(dim=1).round()
    return Support(indices, prob.log(), weight, rest_p.log(), rest_n, members[0].num_classes)


def support_kl_rows(target: Support, log_q: Tensor) -> Tensor:
    """[rows] KL(target || q) for dense receiver log-probabilities `log_q`."""
    at = log_q.gather(1, target.indices)  # log q at the sent indices
    p = target.log_p.exp()
    terms = p * (target.log_p - at)
    if target.weight is not None:
        terms, at = terms * target.weight, at * target.weight
    total = terms.sum(dim=1)
    rho = target.rest_log_p.exp()
    rest_log_q = log_q.sum(dim=1) - at.sum(dim=1)
    has_rest = rho > 0  # rho log rho -> 0 as rho -> 0
    rest = target.rest_n * rho * torch.where(has_rest, target.rest_log_p, 0.0) - rho * rest_log_q
    return total + torch.where(has_rest, rest, 0.0)


def topk_kl_rows(target: TopK, log_q: Tensor) -> Tensor:
    """[rows] KL(target || q) for a top-k target."""
    return support_kl_rows(from_topk(target), log_q)


def _mean(per_row: Tensor, rows: Tensor | None) -> Tensor:
    if rows is None:
        return per_row.mean()
    return per_row.masked_fill(~rows, 0.0).sum() / rows.sum().clamp(min=1)


def topk_kl(target: TopK, log_q: Tensor, rows: Tensor | None = None) -> Tensor:
    """KL(target || q): summed over classes, averaged over rows (or the `rows` mask's rows; 0
    when none is marked), as losses.kl reduces the dense one."""
    return _mean(topk_kl_rows(target, log_q), rows)


def mutual_kl(
    logits: Tensor, others: Sequence[TopK], temperature: float = 1.0,
    rows: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """DML's mimicry towards top-k peers: 1/(K-1) sum_l KL(p_l || p_k), scaled by T^2 (as
    losses.mutual_kl for dense peers)."""
    log_q = torch.log_softmax(logits / temperature, dim=1)
    links = [
        _mean(support_kl_rows(tempered(from_topk(o), temperature), log_q), rows) for o in others
    ]
    return torch.stack(links).mean() * temperature**2


def ensemble_kl(
    logits: Tensor, others: Sequence[TopK], temperature: float = 1.0, rows: Tensor | None = None
) -> Tensor:
    """DML_e's mimicry towards the mean of top-k peers' (tempered) probabilities, scaled by
    T^2 (as losses.ensemble_kl with `ensemble: probs`)."""
    target = ensemble([tempered(from_topk(o), temperature) for o in others])
    log_q = torch.log_softmax(logits / temperature, dim=1)
    return _mean(support_kl_rows(target, log_q), rows) * temperature**2


def kd_loss(logits: Tensor, teacher: TopK, temperature: float) -> Tensor:
    """Hinton KD towards a top-k teacher: T^2 KL(p_t^T || p_s^T), mean over rows (as
    losses.kd_loss)."""
    return mutual_kl(logits, [teacher], temperature)
