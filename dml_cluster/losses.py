"""Loss functions: pure, on logits and log-probabilities, knowing nothing of processes or buses.

Conventions: KL(q || p) = sum_c q_c (log q_c - log p_c), summed over classes and averaged over
the batch. Peers' predictions arrive as log-probabilities at temperature 1 (what travels on the
bus); a temperature T is re-applied as log_softmax(log_p / T), which equals log_softmax(z / T)
because log_softmax ignores a per-row shift. Targets from other peers are always detached.
`rows` ([B] bool, where given) restricts a divergence's mean to the marked samples without
selecting them (a boolean index would make an accelerator wait for the host); none marked: 0.
`count` (a 0-d tensor, where given) is what such a mean divides by instead of the batch's own
marked count (a data-parallel replica's share of the whole batch's count; 0: nothing marked
anywhere, the mean is 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

UNLABELLED = -1


def _denominator(marked: Tensor, count: Tensor | None) -> Tensor:
    """The marked count (at least 1), or `count` where given (1 where it is 0)."""
    if count is None:
        return marked.clamp(min=1)
    return torch.where(count > 0, count, torch.ones_like(count))


def cross_entropy(logits: Tensor, target: Tensor, count: Tensor | None = None) -> Tensor:
    """Mean CE over the labelled samples (target != -1); 0 when none is labelled. `count`: the
    labelled count to divide by in place of this batch's (module docstring)."""
    # no host read of the labels (an accelerator would sync every step): the unlabelled rows
    # are ignored in a sum, divided by the labelled count (at least 1: all unlabelled -> 0).
    labelled = (target != UNLABELLED).sum()
    # deterministic: [B, C] logits: nll_loss's 1-D-target CUDA kernels reduce in one block
    # without atomics; only nll_loss2d (spatial targets) raises under strict mode
    total = F.cross_entropy(logits, target, ignore_index=UNLABELLED, reduction="sum")
    return total / _denominator(labelled, count)


def tempered(log_p: Tensor, temperature: float) -> Tensor:
    """Log-probabilities at temperature T from logits or log-probabilities at T = 1."""
    return F.log_softmax(log_p / temperature, dim=1)


def masked_mean(per_sample: Tensor, rows: Tensor | None, count: Tensor | None = None) -> Tensor:
    """Mean over the samples, or over those marked in `rows` (0 when none is; divided by
    `count` where given)."""
    if rows is None:
        return per_sample.mean()
    return per_sample.masked_fill(~rows, 0.0).sum() / _denominator(rows.sum(), count)


def kl(
    target_log_p: Tensor, log_p: Tensor, rows: Tensor | None = None, count: Tensor | None = None
) -> Tensor:
    """KL(target || p): sum over classes, mean over samples. The arguments come in the formula's
    order, the opposite of `F.kl_div(log_p, target)`."""
    return masked_mean((target_log_p.exp() * (target_log_p - log_p)).sum(dim=1), rows, count)


def js_div(
    log_a: Tensor, log_b: Tensor, rows: Tensor | None = None, count: Tensor | None = None
) -> Tensor:
    """Jensen-Shannon divergence 1/2 KL(a || m) + 1/2 KL(b || m), m = (a + b) / 2."""
    log_m = torch.logsumexp(torch.stack([log_a, log_b]), dim=0) - math.log(2.0)
    return 0.5 * kl(log_a, log_m, rows, count) + 0.5 * kl(log_b, log_m, rows, count)


def entropy(log_p: Tensor) -> Tensor:
    """Mean posterior entropy in nats."""
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def mutual_kl(
    logits: Tensor, others: Sequence[Tensor], temperature: float = 1.0,
    rows: Tensor | None = None, count: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """DML mimicry for one peer: 1/(K-1) sum_l KL(p_l || p_k), scaled by T^2."""
    log_p = tempered(logits, temperature)
    links = [kl(tempered(o.detach(), temperature), log_p, rows, count) for o in others]
    return torch.stack(links).mean() * temperature**2


def mutual_js(
    logits: Tensor, others: Sequence[Tensor], temperature: float = 1.0,
    rows: Tensor | None = None, count: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Symmetric DML mimicry: 1/(K-1) sum_l JS(p_l, p_k), scaled by T^2."""
    log_p = tempered(logits, temperature)
    links = [js_div(tempered(o.detach(), temperature), log_p, rows, count) for o in others]
    return torch.stack(links).mean() * temperature**2


def ensemble_log_probs(log_ps: Sequence[Tensor]) -> Tensor:
    """log of the mean of probabilities: log(1/n sum_l p_l)."""
    return torch.logsumexp(torch.stack(list(log_ps)), dim=0) - math.log(len(log_ps))


def geometric_ensemble_log_probs(log_ps: Sequence[Tensor]) -> Tensor:
    """log softmax of the mean of log-probabilities: a normalised geometric mean of the
    probabilities (averaging logits); on average sharper than the arithmetic mean."""
    return F.log_softmax(torch.stack(list(log_ps)).mean(dim=0), dim=1)


ENSEMBLES = {"probs": ensemble_log_probs, "logits": geometric_ensemble_log_probs}
"""How DML_e combines the other peers' predictions into its target (`method.ensemble`)."""


def ensemble_kl(
    logits: Tensor, others: Sequence[Tensor], temperature: float = 1.0, ensemble: str = "probs",
    rows: Tensor | None = None, count: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """DML_e mimicry: KL(p_bar || p_k), p_bar the others' ensemble (`ENSEMBLES[ensemble]`)."""
    target = ENSEMBLES[ensemble]([tempered(o.detach(), temperature) for o in others])
    return kl(target, tempered(logits, temperature), rows, count) * temperature**2


# -- distillation from a teacher ------------------------------------------------------------------
# Teachers' predictions may be logits or log-probabilities at T = 1: every function below only
# uses them through softmax / log_softmax, which ignore a per-row shift.


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _kl_rows(target_log_p: Tensor, log_p: Tensor) -> Tensor:
    """Per-sample KL(target || p), summed over classes."""
    return (target_log_p.exp() * (target_log_p - log_p)).sum(dim=1)


def kd_loss(logits: Tensor, teacher: Tensor, temperature: float, reduction: str = "mean") -> Tensor:
    """Hinton KD, T^2 KL(p_t^T || p_s^T); per sample, d/dz_s = T (p_s^T - p_t^T)."""
    t = temperature
    per_sample = _kl_rows(tempered(teacher.detach(), t), tempered(logits, t)) * t**2
    return _reduce(per_sample, reduction)


def _target_split(scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From scores z/T: log b = log [p_t, 1 - p_t], log p_hat (non-target classes) and the mask."""
    mask = F.one_hot(target, scores.shape[1]).bool()
    log_p = F.log_softmax(scores, dim=1)
    log_pt = log_p.gather(1, target[:, None])
    log_rest = torch.logsumexp(log_p.masked_fill(mask, float("-inf")), dim=1, keepdim=True)
    log_hat = F.log_softmax(scores.masked_fill(mask, float("-inf")), dim=1)
    return torch.cat([log_pt, log_rest], dim=1), log_hat, mask


def dkd_parts(
    logits: Tensor,
    teacher: Tensor,
    target: Tensor,
    temperature: float,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Decoupled KD (Zhao et al. 2022): (TCKD, NCKD), both scaled by T^2.

    TCKD = T^2 KL(b_t || b_s) on the binary split b = [p_target, 1 - p_target]; NCKD = T^2
    KL(p_hat_t || p_hat_s) among the non-target classes. KD = TCKD + (1 - p_target^teacher) NCKD.
    Every sample must be labelled.
    """
    t = temperature
    b_s, hat_s, mask = _target_split(logits / t, target)
    b_t, hat_t, _ = _target_split(teacher.detach() / t, target)
    tckd = _kl_rows(b_t, b_s) * t**2
    # the target column is -inf in both p_hat: leave it out of the sum (0 * (-inf) would be nan)
    hat_t0, hat_s0 = hat_t.masked_fill(mask, 0.0), hat_s.masked_fill(mask, 0.0)
    nckd = (hat_t.exp() * (hat_t0 - hat_s0)).sum(dim=1) * t**2
    return _reduce(tckd, reduction), _reduce(nckd, reduction)


def hint_loss(regressed: Tensor, hint: Tensor) -> Tensor:
    """FitNets hint loss: mean squared error between the regressed guided layer and the hint."""
    return F.mse_loss(regressed, hint.detach())
