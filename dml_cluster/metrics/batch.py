"""How each peer stands against the rest of the cohort on one batch: accuracy, entropy, divergence.

Divergence follows the DML loss's direction: for peer k and another peer l, KL(p_l || p_k) is
what peer k's mimicry term pulls down (the formulas of `losses`, batched over the other peers).
It runs on the steps an observer asks for (the run log's, the exporter's sampled ones): one copy of
the batch's predictions to the CPU, then a fixed handful of array operations whatever the cohort
size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dml_cluster.devices import all_on
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
    divergence but not for accuracy. The arithmetic runs in numpy on the CPU, in float64, on
    every pair at once (a fixed count of operations whatever the cohort size): on arrays this
    small, numpy's per-operation cost is a fraction of torch's.
    """
    order = sorted(log_ps)
    row = {j: n for n, j in enumerate(order)}
    cols = [row[k] for k in peers]
    log_p = torch.stack(all_on([log_ps[j].detach() for j in order], log_ps[peers[0]].device))
    log_p = log_p.cpu().numpy().astype(np.float64)  # [K, B, C]
    y = target.detach().cpu().numpy()
    n_peers, batch = log_p.shape[:2]
    p = np.exp(log_p)
    pred = log_p.argmax(-1)  # [K, B]
    labelled = y != UNLABELLED
    n_labelled = int(labelled.sum())
    accuracy = ((pred[cols] == y) & labelled).sum(-1) / max(n_labelled, 1)
    entropy = -(p * log_p).sum((1, 2)) / batch  # H(p_l), mean over samples
    # E_l[log p_k] for every l (rows) and every k of `peers` (columns): one matrix product
    cross = p.reshape(n_peers, -1) @ log_p[cols].reshape(len(cols), -1).T / batch
    kl = -entropy[:, None] - cross  # KL(p_l || p_k)
    # JS is symmetric: one mixture per unordered pair {l, k}, k among `peers`
    pairs = sorted({(min(n, c), max(n, c)) for c in cols for n in range(n_peers) if n != c})
    first = np.array([a for a, _ in pairs], dtype=np.intp)
    second = np.array([b for _, b in pairs], dtype=np.intp)
    m = 0.5 * (p[first] + p[second])  # [pairs, B, C]
    h_m = -(m * np.log(np.maximum(m, _TINY))).sum((1, 2)) / batch  # H(m)
    js_pair = (h_m - 0.5 * (entropy[first] + entropy[second])).tolist()
    js = {pair: v for pair, v in zip(pairs, js_pair, strict=True)}  # JS = H(m) - mean H
    agreement = (pred[:, None] == pred[None, cols]).mean(-1)
    kl_l, agree_l, entropy_l = kl.tolist(), agreement.tolist(), entropy.tolist()
    acc_l = accuracy.tolist()
    out = {}
    for c, k in enumerate(peers):
        own = row[k]
        out[k] = PeerBatchStats(
            acc_l[c] if n_labelled else None,
            entropy_l[own],
            {
                j: PairStats(kl_l[n][c], js[min(n, own), max(n, own)], agree_l[n][c])
                for j, n in row.items()
                if n != own
            },
        )
    return out


def peer_batch_stats(log_ps: dict[int, Tensor], target: Tensor, peer: int) -> PeerBatchStats:
    """`cohort_batch_stats` for one peer."""
    return cohort_batch_stats(log_ps, target, [peer])[peer]
