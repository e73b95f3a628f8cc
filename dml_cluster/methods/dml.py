"""Deep Mutual Learning (Zhang et al. 2018): CE + the mean of detached KL links to the other peers.

Variants: `dml` (KL), `dml_js` (Jensen-Shannon, symmetric), `dml_e` (KL to the mean of the other
peers' probabilities), `independent` (CE only: the baseline; peers still exchange predictions,
so the cohort's ensemble accuracy and divergence are still measured).
Semi-supervised: CE on labelled samples only; mimicry on every sample unless
`unlabelled_mimicry` is off.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dml_cluster import losses
from dml_cluster.config import MethodConfig
from dml_cluster.methods import LossParts, register


@register("dml")
class MutualLearning:
    """L_k = CE(y, p_k) + weight * 1/(K-1) sum_{l != k} KL(p_l || p_k)."""

    divergence = staticmethod(losses.mutual_kl)

    def __init__(self, cfg: MethodConfig) -> None:
        self.weight = cfg.weight
        self.temperature = cfg.temperature
        self.unlabelled_mimicry = cfg.unlabelled_mimicry

    def __call__(self, logits: Tensor, target: Tensor, others: Sequence[Tensor]) -> LossParts:
        ce = losses.cross_entropy(logits, target)
        if not self.unlabelled_mimicry:
            rows = target != losses.UNLABELLED
            logits, others = logits[rows], [o[rows] for o in others]
        if self.weight == 0.0 or not others or logits.shape[0] == 0:
            mimicry = ce.detach() * 0.0
            return LossParts(ce, ce, mimicry)
        mimicry = self.divergence(logits, others, self.temperature)
        return LossParts(ce + self.weight * mimicry, ce, mimicry)


@register("dml_js")
class SymmetricMutualLearning(MutualLearning):
    """DML with the Jensen-Shannon divergence in place of KL."""

    divergence = staticmethod(losses.mutual_js)


@register("dml_e")
class EnsembleTeacher(MutualLearning):
    """DML_e: L_k = CE + weight * KL(p_bar || p_k), p_bar = mean of the other peers' p."""

    divergence = staticmethod(losses.ensemble_kl)


@register("independent")
class Independent(MutualLearning):
    """CE only: each peer trains alone (the baseline)."""

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.weight = 0.0
