"""Accuracy, per-class accuracy, cohort ensemble accuracy, posterior entropy, calibration (test
NLL, ECE), peer divergence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dml_cluster import losses
from dml_cluster.calibration import expected_calibration_error, nll
from dml_cluster.devices import on_one_device
from dml_cluster.models import as_rows


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Float32 log-probabilities of `model` on `x` (on x's device), in eval mode, batch by
    batch, each batch run on the model's device; rows [N, C] (a language model's: one row per
    position, `models.as_rows`)."""
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), x).device
    out = []
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size].to(device, non_blocking=True)
        out.append(F.log_softmax(as_rows(model(batch)).float(), dim=1).to(x.device))
    model.train(was_training)
    return torch.cat(out)


def class_counts(y: Tensor, num_classes: int, weights: Tensor | None = None) -> Tensor:
    """Per-class sums of `weights` (default: 1 per sample) as a float tensor [num_classes].

    A one-hot sum rather than torch.bincount(weights=...), which raises on CUDA under
    deterministic algorithms; the counts are whole numbers, so the float sum is exact.
    """
    one_hot = F.one_hot(y, num_classes).float()
    if weights is not None:
        one_hot = one_hot * weights.float()[:, None]
    return one_hot.sum(0)


def per_class_accuracy(log_p: Tensor, y: Tensor, num_classes: int) -> list[float]:
    correct = (log_p.argmax(1) == y).float()
    total = class_counts(y, num_classes)
    hits = class_counts(y, num_classes, weights=correct)
    return (hits / total.clamp(min=1)).tolist()


def accuracy(log_p: Tensor, y: Tensor) -> float:
    return (log_p.argmax(1) == y).float().mean().item()


def evaluate_cohort(
    log_ps: dict[str, Tensor],
    y: Tensor,
    num_classes: int,
    ensemble_of: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every peer's and the ensemble's accuracy, entropy, and pairwise KL / agreement.

    The ensemble averages the probabilities of `ensemble_of` (default: every peer; the trainer
    passes the students, so a teacher's accuracy is reported but not mixed into the ensemble).
    """
    device = next(iter(log_ps.values())).device  # the peers' GPUs may differ: the first's
    log_ps = on_one_device(log_ps, device)
    y = y.to(device)
    report: dict[str, Any] = {"peers": {}, "pairs": {}}
    for name, log_p in log_ps.items():
        report["peers"][name] = {
            "accuracy": accuracy(log_p, y),
            "per_class": per_class_accuracy(log_p, y, num_classes),
            "entropy": losses.entropy(log_p).item(),
            "nll": nll(log_p, y),
            "ece": expected_calibration_error(log_p, y),
        }
    members = list(log_ps) if ensemble_of is None else list(ensemble_of)
    ens = losses.ensemble_log_probs([log_ps[n] for n in members])
    report["ensemble"] = {
        "members": members,
        "accuracy": accuracy(ens, y),
        "per_class": per_class_accuracy(ens, y, num_classes),
        "entropy": losses.entropy(ens).item(),
        "nll": nll(ens, y),
        "ece": expected_calibration_error(ens, y),
    }
    for a, log_a in log_ps.items():
        for b, log_b in log_ps.items():
            if a != b:
                report["pairs"][f"{a}|{b}"] = {
                    "kl": losses.kl(log_b, log_a).item(),  # KL(p_other || p_peer)
                    "js": losses.js_div(log_b, log_a).item(),
                    "agreement": (log_a.argmax(1) == log_b.argmax(1)).float().mean().item(),
                }
    return report


def per_class_table(report: dict[str, Any], class_names: tuple[str, ...]) -> str:
    """A Markdown table: one row per class, one column per peer and the ensemble."""
    columns = {**{n: r["per_class"] for n, r in report["peers"].items()}}
    if len(report["peers"]) > 1:
        columns["ensemble"] = report["ensemble"]["per_class"]
    head = "| class | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [
        f"| {cls} | " + " | ".join(f"{100 * acc[i]:.2f}" for acc in columns.values()) + " |"
        for i, cls in enumerate(class_names)
    ]
    overall = [report["peers"][n]["accuracy"] for n in report["peers"]]
    if len(report["peers"]) > 1:
        overall.append(report["ensemble"]["accuracy"])
    rows.append("| **overall** | " + " | ".join(f"**{100 * a:.2f}**" for a in overall) + " |")
    return "\n".join([head, rule, *rows])
