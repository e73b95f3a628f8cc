"""Peers that look trained and are not: training accuracy high, evaluation no better than chance.

The usual cause is BatchNorm: a training batch is normalised by its own statistics, an
evaluation batch by the running statistics, which a layer moves towards each training batch's by
its `momentum`. After t updates they still hold (1 - momentum)^t of their initial values (mean
0, variance 1): with torchvision's `mobilenet_v3_small` (momentum 0.01) that is 64% after 45
steps, so the model reaches 100% on its training batches and sits at chance on the test set.

Thresholds (documented in the README, "Models that look trained and are not"):
- chance is 1/C for C classes; an evaluation accuracy is *no better than chance* when it is at
  most 1/C + Z * sqrt((1/C)(1 - 1/C) / n) on n evaluation samples (Z = 3: a model that guesses
  lands below that bound with probability about 0.9987, the normal approximation's);
- a training accuracy is *high* when it is at least halfway from chance to perfect, (1 + 1/C) / 2,
  on the training batches the run log samples (every `run.log_every` steps), the later half of
  those since the previous evaluation (where training has got to, not where the epoch began).

`ChanceWatch` checks every hosted peer at each evaluation and warns once per peer and start: one
line after the epoch line, a `warning` record in the peer's log (which `dml-cluster report`
shows). `batchnorm_facts` says whether BatchNorm's running statistics can explain it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from torch import nn

from dml_cluster.metrics.events import EvalEvent, StepEvent
from dml_cluster.run_folder import JsonlLog

Z = 3.0
"""Standard errors above chance an evaluation accuracy may lie and still be "at chance"."""

STALE = 0.05
"""Running statistics still holding at least this share of their initial values are stale."""


def chance(num_classes: int) -> float:
    """The accuracy of a guess: 1/C."""
    return 1.0 / num_classes


def chance_bound(num_classes: int, samples: int) -> float:
    """The highest accuracy on `samples` evaluation samples still "no better than chance"."""
    p = chance(num_classes)
    return p + Z * math.sqrt(p * (1.0 - p) / max(samples, 1))


def high_accuracy(num_classes: int) -> float:
    """The lowest training accuracy called high: halfway from chance to 1."""
    return (1.0 + chance(num_classes)) / 2.0


@dataclass(frozen=True)
class BatchNormFacts:
    """A model's BatchNorm layers that keep running statistics: how many, their momentum values
    (None: a cumulative average), and the fewest updates any of them has had."""

    layers: int
    momenta: tuple[float | None, ...]
    updates: int

    @property
    def stale_share(self) -> float:
        """The largest share of their initial values the running statistics still hold,
        (1 - momentum)^updates for the smallest momentum (a cumulative average: none left)."""
        if self.updates == 0:
            return 1.0
        numbers = [m for m in self.momenta if m is not None]
        return (1.0 - min(numbers)) ** self.updates if numbers else 0.0

    def describe(self) -> str:
        """`N layers, momentum m, t updates: they still hold s% of their initial values`."""
        momenta = ", ".join("cumulative" if m is None else f"{m:g}" for m in self.momenta)
        plural = "s" if self.layers > 1 else ""
        return (
            f"{self.layers} layer{plural}, momentum {momenta}, {self.updates} updates: they "
            f"still hold {100 * self.stale_share:.0f}% of their initial values"
        )


def batchnorm_facts(model: nn.Module) -> BatchNormFacts | None:
    """The BatchNorm layers of `model` that keep running statistics, or None when it has none."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None
    ]
    if not layers:
        return None
    momenta = sorted({m.momentum for m in layers}, key=lambda m: -1.0 if m is None else m)
    updates = min(int(m.num_batches_tracked) for m in layers)  # type: ignore[arg-type]
    return BatchNormFacts(len(layers), tuple(momenta), updates)


def stale_statistics(facts: BatchNormFacts) -> str:
    """What stale BatchNorm running statistics do, and what to do about them."""
    return (
        f"BatchNorm's running statistics ({facts.describe()}); evaluation normalises with "
        "them, training with each batch's own: raise the layers' momentum (torch's default: "
        "0.1) or train longer"
    )


def likely_cause(facts: BatchNormFacts | None) -> str:
    """What most likely makes a model good on its training batches and at chance in evaluation."""
    if facts is None:
        return (
            "no BatchNorm layer keeps running statistics, so look for a difference between "
            "the splits (labels, preprocessing) or a model that memorises its training set"
        )
    if facts.stale_share >= STALE:
        return f"likely {stale_statistics(facts)}"
    return (
        f"not likely BatchNorm's running statistics ({facts.describe()}); look for a "
        "difference between the splits (labels, preprocessing) or a model that memorises its "
        "training set"
    )


def at_chance_warning(
    name: str,
    eval_accuracy: float,
    train_accuracy: float,
    num_classes: int,
    num_eval: int,
    steps: int,
    facts: BatchNormFacts | None,
) -> str:
    """The one warning line for peer `name`."""
    return (
        f"warning: peer {name}: test accuracy {100 * eval_accuracy:.2f}% is no better than "
        f"chance (1/{num_classes}; at most {100 * chance_bound(num_classes, num_eval):.1f}% on "
        f"{num_eval} samples) while its training accuracy is {100 * train_accuracy:.2f}% after "
        f"{steps} steps: {likely_cause(facts)}"
    )


class ChanceWatch:
    """An observer warning once per hosted peer whose evaluation accuracy is no better than
    chance while its training accuracy is high (the module's docstring has the thresholds).

    It reads the batch statistics on the run log's steps (computed once for both) and the
    evaluation report; nothing else from the device."""

    def __init__(
        self,
        names: Sequence[str],
        models: Mapping[int, nn.Module],
        logs: Mapping[int, JsonlLog],
        num_classes: int,
        num_eval: int,
        every: int,
        out: TextIO | None = None,
    ) -> None:
        """`models`, `logs`: by hosted peer; `every`: the steps between sampled batches (the
        run log's `run.log_every`); `out`: where the line goes (stdout, after the epoch line)."""
        self.names, self.models, self.logs = list(names), models, logs
        self.num_classes, self.num_eval, self.every = num_classes, num_eval, every
        self.out = out
        self._sampled: dict[int, list[float]] = {i: [] for i in models}
        self.warned: set[int] = set()

    def wants_batch_stats(self, step: int) -> bool:
        return step % self.every == 0

    def on_step(self, event: StepEvent) -> None:
        if event.stats is None:
            return
        for i, batch in event.stats.items():
            if i in self._sampled and batch.accuracy is not None:
                self._sampled[i].append(batch.accuracy)

    def on_eval(self, event: EvalEvent) -> None:
        for i, sampled in self._sampled.items():
            name = self.names[i]
            later = sampled[len(sampled) // 2 :]
            peer = event.report["peers"].get(name)
            if i in self.warned or not later or peer is None:
                continue
            train_accuracy = sum(later) / len(later)
            eval_accuracy = float(peer["accuracy"])
            if train_accuracy < high_accuracy(self.num_classes):
                continue
            if eval_accuracy > chance_bound(self.num_classes, self.num_eval):
                continue
            facts = batchnorm_facts(self.models[i])
            line = at_chance_warning(
                name, eval_accuracy, train_accuracy, self.num_classes, self.num_eval,
                event.step, facts,
            )  # fmt: skip
            self.warned.add(i)
            print(line, file=self.out or sys.stdout, flush=True)
            self.logs[i].write(
                "warning", kind="eval_at_chance", step=event.step, epoch=event.epoch, peer=name,
                message=line, eval_accuracy=eval_accuracy, train_accuracy=train_accuracy,
            )  # fmt: skip
        for sampled in self._sampled.values():
            sampled.clear()

    def on_end(self, summary: dict[str, Any]) -> None:
        pass
