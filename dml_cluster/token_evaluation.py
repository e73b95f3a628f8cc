"""Validation of language-model cohorts, chunk by chunk: the measures of `evaluation.py` over
token positions, without holding every position's distribution at once.

A language model's validation predictions are one distribution over the vocabulary per
position: 65,536 positions of a 4,096-token vocabulary are 1 GiB of float32 per peer, too much
to exchange or keep whole. `TokenEvaluation` takes the cohort's log-probabilities of one chunk
of positions at a time (rows [N, V], as the bus delivers them) with the next tokens [N], adds
each measure's sums, and `result()` gives what `evaluation.evaluate_cohort` gives for all rows at
once (the same keys, less the per-class lists, which a vocabulary makes meaningless; plus
perplexity), up to float rounding: per peer and for the ensemble of the students, mean NLL
(`nll`, nats per token), `perplexity` = exp(nll), next-token `accuracy`, mean `entropy`, `ece`
(15 equal-width confidence bins, as `calibration.expected_calibration_error`); per ordered pair,
mean per-token `kl` (KL(p_other || p_peer)), `js` and `agreement` of the top tokens. Sums are
float64 on the host, added in chunk order: the same chunks give the same numbers in every
layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dml_cluster import losses
from dml_cluster.calibration import ECE_BINS
from dml_cluster.devices import on_one_device


class _Sums:
    """Running sums of one predictor's measures."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.count = 0
        self.nll = self.correct = self.entropy = 0.0
        self.gap = torch.zeros(bins, dtype=torch.float64)  # per bin: sum(confidence - correct)

    def add(self, log_p: Tensor, y: Tensor) -> None:
        confidence, predicted = log_p.exp().max(dim=1)
        hit = (predicted == y).to(confidence.dtype)
        which = (confidence * self.bins).ceil().clamp(1, self.bins).long() - 1
        members = F.one_hot(which, self.bins).to(confidence.dtype)  # sums: deterministic
        self.gap += (members * (confidence - hit)[:, None]).sum(dim=0).double().cpu()
        # deterministic: [N, V] inputs: nll_loss's 1-D-target kernels
        self.nll += F.nll_loss(log_p, y, reduction="sum").item()
        self.correct += hit.sum().item()
        self.entropy += -(log_p.exp() * log_p).sum().item()
        self.count += int(y.shape[0])

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        nll = self.nll / n
        return {
            "accuracy": self.correct / n,
            "entropy": self.entropy / n,
            "nll": nll,
            "perplexity": math.exp(min(nll, 700.0)),  # (exp overflows past ~709)
            "ece": float(self.gap.abs().sum()) / n,
            "tokens": self.count,
        }


class TokenEvaluation:
    """Chunked cohort validation over token positions (see the module's docstring)."""

    def __init__(
        self, names: Sequence[str], ensemble_of: Sequence[str] | None = None, bins: int = ECE_BINS
    ) -> None:
        self.names = list(names)
        self.members = list(self.names if ensemble_of is None else ensemble_of)
        self.peers = {n: _Sums(bins) for n in self.names}
        self.ensemble = _Sums(bins)
        self.pairs = {(a, b): [0.0, 0.0, 0.0] for a in self.names for b in self.names if a != b}
        self.count = 0

    def add(self, log_ps: Mapping[str, Tensor], y: Tensor) -> None:
        """One chunk: every peer's log-probabilities [N, V] and the next tokens [N]."""
        device = next(iter(log_ps.values())).device
        log_ps = on_one_device(dict(log_ps), device)
        y = y.reshape(-1).to(device)
        for name in self.names:
            self.peers[name].add(log_ps[name], y)
        self.ensemble.add(losses.ensemble_log_probs([log_ps[n] for n in self.members]), y)
        n = int(y.shape[0])
        for (a, b), sums in self.pairs.items():
            log_a, log_b = log_ps[a], log_ps[b]
            sums[0] += losses.kl(log_b, log_a).item() * n  # KL(p_other || p_peer)
            sums[1] += losses.js_div(log_b, log_a).item() * n
            sums[2] += (log_a.argmax(1) == log_b.argmax(1)).sum().item()
        self.count += n

    def result(self) -> dict[str, Any]:
        n = max(self.count, 1)
        return {
            "peers": {name: sums.result() for name, sums in self.peers.items()},
            "ensemble": {"members": self.members, **self.ensemble.result()},
            "pairs": {
                f"{a}|{b}": {"kl": s[0] / n, "js": s[1] / n, "agreement": s[2] / n}
                for (a, b), s in self.pairs.items()
            },
        }


def token_table(report: Mapping[str, Any]) -> str:
    """A Markdown table of a language-model evaluation: per peer (and the ensemble of several)
    validation loss (nats per token), perplexity, next-token accuracy and ECE."""
    rows = dict(report["peers"])
    if len(rows) > 1:
        rows["ensemble"] = report["ensemble"]
    lines = [
        "| peer | val loss | perplexity | next-token acc. % | ECE |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['nll']:.4f} | {r['perplexity']:.2f} | {100 * r['accuracy']:.2f} | "
            f"{r['ece']:.4f} |"
        )
    return "\n".join(lines)
