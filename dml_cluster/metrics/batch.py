"""How one peer stands against the rest of the cohort on one batch: accuracy, entropy, divergence.

Divergence follows the DML loss's direction: for peer k and another peer l, KL(p_l || p_k) is
what peer k's mimicry term pulls down. Everything is reduced to Python floats in one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dml_cluster import losses


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
def peer_batch_stats(log_ps: dict[int, Tensor], target: Tensor, peer: int) -> PeerBatchStats:
    """Statistics of `peer` on a batch, given every peer's log-probabilities [B, C] on it.

    `target` holds -1 for unlabelled samples (semi-supervised runs); they count for entropy and
    divergence but not for accuracy.
    """
    own = log_ps[peer]
    others = [j for j in sorted(log_ps) if j != peer]
    pred = own.argmax(1)
    labelled = target.to(own.device) != losses.UNLABELLED
    n_labelled = labelled.sum()
    correct = (pred == target.to(own.device)) & labelled
    values = [correct.sum() / n_labelled.clamp(min=1), n_labelled.float(), losses.entropy(own)]
    for j in others:
        other = log_ps[j].to(own.device).float()
        values += [
            losses.kl_div(other, own),
            losses.js_div(other, own),
            (other.argmax(1) == pred).float().mean(),
        ]
    flat = torch.stack([v.float() for v in values]).tolist()
    acc, n, ent, rest = flat[0], flat[1], flat[2], flat[3:]
    pairs = {j: PairStats(*rest[3 * slot : 3 * slot + 3]) for slot, j in enumerate(others)}
    return PeerBatchStats(accuracy=acc if n > 0 else None, entropy=ent, pairs=pairs)
