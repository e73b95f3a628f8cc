"""Losses against sparse targets, computed on the sent support: no dense [rows, C] target.

Top-k rows

A sparse target is `Support`: per row, log-probabilities at some class indices (each index
counted with a weight, 1 unless the support lists it more than once) and one probability rho
shared by each of the n_rest classes not listed. Its KL to a receiver's log q [rows, C]:

    KL(p || q) = sum_S w_i p_i (log p_i - log q_i) + n_rest rho log rho - rho sum_rest log q_j,

with sum_rest log q_j = sum_all log q - sum_S w_i log q_i (rest terms 0 where rho = 0). A top-k
target (kept log-probabilities v_i, residual mass r spread over m = C - k classes) is the case
w = 1, rho = r / m, n_rest = m. Tempering (p^(1/T), renormalised) and DML_e's probability
ensemble (the mean of the members' probabilities) keep this form, so both stay sparse. This
target is biased: the mass outside the top k is spread evenly, not where the sender put it
(the bias is measured in tests/test_sparse_sampled.py and benchmarks/BENCHMARKS.md).

Sampled rows (Sparse Logit Sampling, Anshumann et al. 2025)
-----------------------------------------------------------
The sender drew n ids x_1..x_n with replacement from p_T = softmax(log p / T), T the temperature
the receiver distils at, and sent each distinct id i with its count c_i and log p_T(i). The
receiver's term for one row, with log q_T = log_softmax(z / T) its own log-probabilities:

    L = sum_i (c_i / n) (log p_T(i) - log q_T(i))        (i over the distinct ids drawn)

    dL/dz = (1 / T) (q_T * sum_i c_i / n - c / n) = (q_T - c / n) / T,

since the counts add up to n (c / n is the [C] vector of counts over n, 0 where nothing was
drawn). Each c_i is Binomial(n, p_T(i)), so E[c / n] = p_T and E[dL/dz] = (q_T - p_T) / T, which
is exactly the gradient of the dense KL(p_T || q_T): the estimator is unbiased for the gradient
w.r.t. the receiver's logits, for any n >= 1, with variance p_T(1 - p_T) / (n T^2) per logit.
L itself is an unbiased estimate of KL(p_T || q_T) (a mean of f(x_j) = log p_T(x_j) -
log q_T(x_j) over draws from p_T). Means over rows, the T^2 factor and the average over peers
are linear, so DML's, KD's and the masked terms stay unbiased. The draws are already at T: no
tempering on the receiving side (the cohort refuses receivers of one sender that distil at
different temperatures: config.draw_temperatures).

DML_e's probability ensemble of sampled members: the target p_bar = mean_l p_T,l is estimated
by the mixture of the members' draws, weights c_{l,i} / (n (K - 1)) on the union of their ids,
and the term's gradient is (q_T - mixture) / T, unbiased for the dense ensemble's (q_T - p_bar)
/ T. p_bar's own log-probability at a drawn id is unknown where another member did not draw
it, so the term is computed as the mean of the members' estimators above, which has exactly that
gradient; its value estimates mean_l KL(p_T,l || q_T), an upper bound of KL(p_bar || q_T)
(Jensen), the same gradient as the dense DML_e term (whose gradient equals DML's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dml_cluster.losses import masked_mean
from dml_cluster.sparse_rows import Rows, Sampled, TopK


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


def sampled_kl_rows(target: Sampled, log_q: Tensor) -> Tensor:
    """[rows] the unbiased estimate of KL(p_T || q) from ids drawn from p_T (see the module's
    docstring), `log_q` the receiver's log-probabilities at the draws' temperature."""
    rows = target.widened()
    at = log_q.gather(1, rows.indices)  # padding slots: weight 0
    return (rows.weights() * (rows.values - at)).sum(dim=1)


def topk_kl(
    target: TopK, log_q: Tensor, rows: Tensor | None = None, count: Tensor | None = None
) -> Tensor:
    """KL(target || q): summed over classes, averaged over rows (or the `rows` mask's rows; 0
    when none is marked; `count`: as in losses), as losses.kl reduces the dense one."""
    return masked_mean(topk_kl_rows(target, log_q), rows, count)


def sampled_kl(
    target: Sampled, log_q: Tensor, rows: Tensor | None = None, count: Tensor | None = None
) -> Tensor:
    """`sampled_kl_rows` averaged over rows (or the `rows` mask's rows) as `topk_kl`."""
    return masked_mean(sampled_kl_rows(target, log_q), rows, count)


def _link_rows(other: Rows, log_q: Tensor, temperature: float) -> Tensor:
    """[rows] the KL link towards one peer's sparse rows at `temperature` (top-k: tempered
    here; sampled: drawn at it)."""
    if isinstance(other, Sampled):
        return sampled_kl_rows(other, log_q)
    return support_kl_rows(tempered(from_topk(other), temperature), log_q)


def mutual_kl(
    logits: Tensor, others: Sequence[Rows], temperature: float = 1.0,
    rows: Tensor | None = None, count: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """DML's mimicry towards sparse peers: 1/(K-1) sum_l KL(p_l || p_k), scaled by T^2 (as
    losses.mutual_kl for dense peers; for sampled peers, its unbiased estimate)."""
    log_q = torch.log_softmax(logits / temperature, dim=1)
    links = [masked_mean(_link_rows(o, log_q, temperature), rows, count) for o in others]
    return torch.stack(links).mean() * temperature**2


def ensemble_kl(
    logits: Tensor, others: Sequence[Rows], temperature: float = 1.0,
    rows: Tensor | None = None, count: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """DML_e's mimicry towards the mean of sparse peers' (tempered) probabilities, scaled by
    T^2 (as losses.ensemble_kl with `ensemble: probs`). Top-k peers: KL to their sparse
    ensemble; sampled peers: the mean of their estimators (the module's docstring says why)."""
    if others and isinstance(others[0], Sampled):
        return mutual_kl(logits, others, temperature, rows, count)
    target = ensemble([tempered(from_topk(o), temperature) for o in others])
    log_q = torch.log_softmax(logits / temperature, dim=1)
    return masked_mean(support_kl_rows(target, log_q), rows, count) * temperature**2


def kd_loss(logits: Tensor, teacher: Rows, temperature: float) -> Tensor:
    """Hinton KD towards a sparse teacher: T^2 KL(p_t^T || p_s^T), mean over rows (as
    losses.kd_loss; for a sampled teacher, its unbiased estimate)."""
    return mutual_kl(logits, [teacher], temperature)
