"""Deep Mutual Learning (Zhang et al. 2018): CE + the mean of detached KL links to fellow students.

Variants: `dml` (KL), `dml_js` (Jensen-Shannon, symmetric), `dml_e` (KL to the mean of the other
students' probabilities), `independent` (CE only: the baseline; peers still exchange predictions,
so the cohort's ensemble accuracy and divergence are still measured).
Semi-supervised: CE on labelled samples only; mimicry on every sample unless
`unlabelled_mimicry` is off. These methods learn from students only: a cohort with teachers is
refused at config time (use `kd` / `dkd` with `peer_weight` for teacher + DML).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import Tensor

from dml_cluster import losses, losses_sparse
from dml_cluster.method_config.dml import DMLConfig
from dml_cluster.methods.base import LossParts, Method, StepView, dense, sparse

Mimicry = Callable[..., Tensor]  # (logits, peers, temperature, rows=None): losses.mutual_kl's


def mutual_term(
    divergence: Mimicry, logits: Tensor, target: Tensor, peers: Sequence[Tensor],
    temperature: float, unlabelled: bool, count: Tensor | None = None,
) -> Tensor | None:  # fmt: skip
    """The DML mimicry of one student towards `peers`; None when there is nothing to mimic.
    Without `unlabelled`, the mean over the labelled samples (0 when none is; divided by
    `count` where given: `StepView.labelled`)."""
    if not peers or logits.shape[0] == 0:
        return None
    if unlabelled:
        return divergence(logits, peers, temperature)
    rows = target != losses.UNLABELLED  # masked, not selected: no sync
    return divergence(logits, peers, temperature, rows=rows, count=count)


class MutualLearning(Method):
    """L_k = CE(y, p_k) + weight * 1/(K-1) sum_{l != k} KL(p_l || p_k)."""

    divergence = staticmethod(losses.mutual_kl)
    sparse_divergence: Mimicry | None = staticmethod(losses_sparse.mutual_kl)
    """The mimicry towards sparse (top-k, sampled) peers (None: this method reads every class;
    refused at config time, config.check_encoding)."""

    def __init__(self, cfg: DMLConfig) -> None:
        super().__init__(cfg)
        self.weight, self.temperature = cfg.weight, cfg.temperature
        self.unlabelled_mimicry = cfg.unlabelled_mimicry

    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        ce = losses.cross_entropy(logits, target, view.labelled)
        mimicry = None
        if self.weight != 0.0:
            rows = sparse(view.peers)
            divergence, peers = (
                (self.divergence, dense(view.peers)) if rows is None
                else (self.sparse_divergence, rows)
            )  # fmt: skip
            mimicry = mutual_term(
                divergence, logits, target, peers, self.temperature, self.unlabelled_mimicry,
                view.labelled,
            )  # fmt: skip
        if mimicry is None:
            return LossParts(ce, ce, ce.detach() * 0.0)
        return LossParts(ce + self.weight * mimicry, ce, mimicry)


class SymmetricMutualLearning(MutualLearning):
    """DML with the Jensen-Shannon divergence in place of KL."""

    divergence = staticmethod(losses.mutual_js)
    sparse_divergence = None


class EnsembleTeacher(MutualLearning):
    """DML_e: L_k = CE + weight * KL(p_bar || p_k), p_bar the other students' ensemble:
    the mean of their probabilities (`ensemble: probs`; its gradient equals DML's), or softmax
    of the mean of their log-probabilities (`ensemble: logits`; the sharper target)."""

    def __init__(self, cfg: DMLConfig) -> None:
        super().__init__(cfg)
        self.divergence = functools.partial(losses.ensemble_kl, ensemble=cfg.ensemble)
        # the probability ensemble of sparse peers stays sparse (losses_sparse.ensemble_kl); the
        # logit ensemble needs every class (refused at config time)
        self.sparse_divergence = losses_sparse.ensemble_kl if cfg.ensemble == "probs" else None


class Independent(MutualLearning):
    """CE only: each student trains alone (the baseline; also how a teacher is trained)."""

    def __init__(self, cfg: DMLConfig) -> None:
        super().__init__(cfg)
        self.weight = 0.0
