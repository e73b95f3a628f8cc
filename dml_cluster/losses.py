"""Loss functions: pure, on logits and log-probabilities, knowing nothing of processes or buses.

Conventions: KL(q || p) = sum_c q_c (log q_c - log p_c), summed over classes and averaged over
the batch. Peers' predictions arrive as log-probabilities at temperature 1 (what travels on the
bus); a temperature T is re-applied as log_softmax(log_p / T), which equals log_softmax(z / T)
because log_softmax ignores a per-row shift. Targets from other peers are always detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

UNLABELLED = -1


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean CE over the labelled samples (target != -1); 0 when none is labelled."""
    labelled = target != UNLABELLED
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], target[labelled])


def tempered(log_p: Tensor, temperature: float) -> Tensor:
    """Log-probabilities at temperature T from logits or log-probabilities at T = 1."""
    return F.log_softmax(log_p / temperature, dim=1)


def kl_div(target_log_p: Tensor, log_p: Tensor) -> Tensor:
    """KL(target || p): sum over classes, mean over samples."""
    return (target_log_p.exp() * (target_log_p - log_p)).sum(dim=1).mean()


def js_div(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Jensen-Shannon divergence 1/2 KL(a || m) + 1/2 KL(b || m), m = (a + b) / 2."""
    log_m = torch.logsumexp(torch.stack([log_a, log_b]), dim=0) - math.log(2.0)
    return 0.5 * kl_div(log_a, log_m) + 0.5 * kl_div(log_b, log_m)


def entropy(log_p: Tensor) -> Tensor:
    """Mean posterior entropy in nats."""
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def mutual_kl(logits: Tensor, others: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """DML mimicry for one peer: 1/(K-1) sum_l KL(p_l || p_k), scaled by T^2."""
    log_p = tempered(logits, temperature)
    links = [kl_div(tempered(o.detach(), temperature), log_p) for o in others]
    return torch.stack(links).mean() * temperature**2


def mutual_js(logits: Tensor, others: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """Symmetric DML mimicry: 1/(K-1) sum_l JS(p_l, p_k), scaled by T^2."""
    log_p = tempered(logits, temperature)
    links = [js_div(tempered(o.detach(), temperature), log_p) for o in others]
    return torch.stack(links).mean() * temperature**2


def ensemble_log_probs(log_ps: Sequence[Tensor]) -> Tensor:
    """log of the mean of probabilities: log(1/n sum_l p_l)."""
    return torch.logsumexp(torch.stack(list(log_ps)), dim=0) - math.log(len(log_ps))


def ensemble_kl(logits: Tensor, others: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """DML_e mimicry: KL(p_bar || p_k), p_bar the mean of the other peers' probabilities."""
    target = ensemble_log_probs([tempered(o.detach(), temperature) for o in others])
    return kl_div(target, tempered(logits, temperature)) * temperature**2
