"""How each peer stands against the rest of the cohort on one batch: accuracy, entropy, divergence.

Divergence follows the DML loss's direction: for peer k and another peer l, KL(p_l || p_k) is
what peer k's mimicry term pulls down (the formulas of `losses`, batched over the other peers).
This runs on every training step while metrics are on: one copy of the batch's predictions to
the CPU, then a handful of array operations whatever the cohort size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dml_cluster.losses import UNLABELLED

_TINY = np.finfo(np.float64).tiny  # m log m -> 0 where m underflows to 0


@dataclass(frozen=True)
class PairStats:
    """Peer k against another peer l on the same samples."""

    kl: float  # KL(p_l || p_k), nats
    js: float  # JS(p_l, p_k), nats
    agreement: float  # fraction of samples where both predict the same class


@dataclass(frozen=True)
class PeerBatchStats:
    accuracy: float | None  # on the labelled samples; None when the batch has none
    entropy: float  # mean posterior entropy, nats
    pairs: dict[int, PairStats]  # by the other peer's index

    def pairs_by_name(self, names: list[str]) -> dict[str, dict[str, float]]:
        """{other peer's name: {kl, js, agreement}}: the form the JSONL logs use."""
        return {
            names[j]: {"kl": p.kl, "js": p.js, "agreement": p.agreement}
            for j, p in self.pairs.items()
        }


@torch.no_grad()
def cohort_batch_stats(
    log_ps: dict[int, Tensor], target: Tensor, peers: Sequence[int]
) -> dict[int, PeerBatchStats]:
    """Statistics of each of `peers` on a batch, given the log-probabilities [B, C] of every
    peer known on it (`log_ps`, by peer index; `peers` must be among them).

    `target` holds -1 for unlabelled samples (semi-supervised runs); they count for entropy and
    divergence but not for accuracy. The arithmetic runs in numpy on the CPU, in float64: on
    tensors this small, numpy's per-operation cost is a fraction of torch's.
    """
    order = sorted(log_ps)
    row = {j: n for n, j in enumerate(order)}
    log_p = torch.stack([log_ps[j].detach().to(log_ps[peers[0]].device) for j in order])
    log_p = log_p.cpu().numpy().astype(np.float64)  # [K, B, C]
    y = target.detach().cpu().numpy()
    p = np.exp(log_p)
    pred = log_p.argmax(-1)  # [K, B]
    labelled = y != UNLABELLED
    n_labelled = int(labelled.sum())
    accuracy = ((pred == y) & labelled).sum(-1) / max(n_labelled, 1)
    entropy = -(p * log_p).sum(-1).mean(-1)  # H(p_l), mean over samples
    out = {}
    for k in peers:
        own, own_p = log_p[row[k]], p[row[k]]
        # KL(p_l || p_k) = -H(p_l) - E_l[log p_k];  JS(p_l, p_k) = H(m) - (H(p_l) + H(p_k)) / 2
        kl = -entropy - (p * own).sum(-1).mean(-1)
        m = 0.5 * (p + own_p)
        h_m = -(m * np.log(np.maximum(m, _TINY))).sum(-1).mean(-1)
        js = h_m - 0.5 * (entropy + entropy[row[k]])
        agreement = (pred == pred[row[k]]).mean(-1)
        pairs = {
            j: PairStats(float(kl[n]), float(js[n]), float(agreement[n]))
            for j, n in row.items()
            if j != k
        }
        acc = float(accuracy[row[k]]) if n_labelled else None
        out[k] = PeerBatchStats(acc, float(entropy[row[k]]), pairs)
    return out


def peer_batch_stats(log_ps: dict[int, Tensor], target: Tensor, peer: int) -> PeerBatchStats:
    """`cohort_batch_stats` for one peer."""
    return cohort_batch_stats(log_ps, target, [peer])[peer]
