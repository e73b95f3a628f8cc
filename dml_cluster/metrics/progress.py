"""Progress of a run while it trains, drawn by the reporting process only.

On a terminal, a live bar per epoch (tqdm): step / steps of the epoch, samples (a language
model's: tokens) per second, every peer's running training cross-entropy, the run's elapsed time
and ETA. Off a terminal (a file, a pipe, a pod's log), one whole line every
`run.progress_every_s` seconds with the same figures.

The running cross-entropy of a peer is its mean over the epoch so far, computed from the
predictions every process receives on the bus (so the reporting process shows every peer's, not
only its own). A step only puts its predictions aside; at a drawing, or once `RunningCrossEntropy`
holds `KEEP_STEPS` steps or `KEEP_VALUES` values of them, they are summed on the device in one
batch per peer, and the sums are read back once per drawing, never per step. Sparse rows (a
top-k or sampled `bus.encoding`) are never densified for it: a step puts aside each row's
log-probability at its label, read from the sparse support (`sparse_rows.log_prob_at`: the
value the densified row holds there), summed as one column would be, in the same batches of
steps as the densified rows would be (the same float).

The elapsed time is the run's, across resumes: `RunClock` keeps it in <run dir>/clock.json (the
reporting process writes it at every progress report, checkpoint and evaluation) and a resumed
run continues from it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

from dml_cluster.console import is_terminal, say
from dml_cluster.metrics.events import EvalEvent, StepEvent
from dml_cluster.run_folder import write_json_atomic
from dml_cluster.sparse_rows import Rows, log_prob_at

CLOCK_FILE = "clock.json"
BAR_REFRESH_S = 0.5  # how often the live bar's figures are recomputed


class RunClock:
    """Seconds the run has trained, over all its attempts: this attempt's time plus what earlier
    attempts recorded in `path` (None: this process neither reads nor writes a record)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.started = time.perf_counter()
        self.before = 0.0

    def carry_on(self) -> None:
        """Continue from the recorded time (on resume); a missing or unreadable record is 0."""
        if self.path is None:
            return
        try:
            recorded = json.loads(self.path.read_text())["elapsed_seconds"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if isinstance(recorded, int | float) and recorded >= 0:
            self.before = float(recorded)

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def record(self, step: int) -> None:
        """Write the elapsed time after `step` steps (atomically; a failed write is skipped)."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            write_json_atomic(
                self.path, {"elapsed_seconds": round(self.elapsed(), 3), "step": step}
            )


@dataclass(frozen=True)
class RunPlan:
    """The run's shape: steps per epoch, steps in all, epochs; `replicas`: the processes a
    peer's batch is split over (cohort.replicas: the reporting process sees 1/D of each batch,
    rates count the whole); what a batch's rows are (`unit`: samples, or a language model's
    tokens)."""

    per_epoch: int
    max_steps: int
    epochs: int
    replicas: int = 1
    unit: str = "samples"

    def steps_in_epoch(self, epoch: int) -> int:
        return max(0, min(self.per_epoch, self.max_steps - epoch * self.per_epoch))


class RunningCrossEntropy:
    """Every peer's training cross-entropy summed over the labelled samples since `reset`, kept
    on the predictions' device until read. `add` keeps references to a step's predictions, which
    are summed in one batch per peer when read or when `KEEP_STEPS` steps or `KEEP_VALUES`
    values (16 MiB of float32) are kept."""

    KEEP_STEPS = 64
    KEEP_VALUES = 1 << 22

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[int, Tensor] = {}
        self.counts: dict[int, Tensor] = {}
        self.kept: list[tuple[Mapping[int, Tensor], Tensor]] = []
        self.kept_values = 0

    def add(self, log_ps: Mapping[int, Tensor | Rows], target: Tensor) -> None:
        """Put a step's predictions aside: [B, C] log-probabilities, or sparse rows, of which
        only each row's log-probability at its label is kept ([B, 1]: a one-column row whose
        label is column 0). Sparse rows count as the [B, C] values they stand for, so the
        steps are summed in the same batches (and the figure is the same float) as dense."""
        if not self.kept_values:  # the first step kept: every step holds as many values
            self.step_values = sum(
                p.numel() if isinstance(p, Tensor) else p.values.shape[0] * p.num_classes
                for p in log_ps.values()
            )
        if not all(isinstance(p, Tensor) for p in log_ps.values()):
            at = target.clamp(min=0)  # unlabelled rows (-1) are ignored when summed
            log_ps = {
                i: p if isinstance(p, Tensor) else log_prob_at(p, at)[:, None]
                for i, p in log_ps.items()
            }
        self.kept.append((log_ps, target))
        self.kept_values += self.step_values
        if len(self.kept) >= self.KEEP_STEPS or self.kept_values >= self.KEEP_VALUES:
            self._sum_kept()

    def _sum_kept(self) -> None:
        kept, self.kept, self.kept_values = self.kept, [], 0
        if not kept:
            return
        with torch.no_grad():
            targets = torch.cat([y for _, y in kept])
            for i in kept[0][0]:
                log_p = torch.cat([log_ps[i] for log_ps, _ in kept])
                y = targets.to(log_p.device)
                if log_p.shape[1] == 1:  # each row's log-probability at its label (`add`)
                    y = y.clamp(max=0)  # the label's column, or -1 (unlabelled): ignored
                # deterministic: [B, C] log-probabilities: nll_loss's 1-D-target kernel
                loss = F.nll_loss(log_p.float(), y, ignore_index=-1, reduction="sum")
                labelled = (y >= 0).sum()
                self.sums[i] = self.sums[i] + loss if i in self.sums else loss
                self.counts[i] = self.counts[i] + labelled if i in self.counts else labelled

    def means(self) -> dict[int, float]:
        """Peer -> mean cross-entropy (peers without a labelled sample yet are left out)."""
        self._sum_kept()
        out = {}
        for i in sorted(self.sums):
            count = int(self.counts[i].item())
            if count:
                out[i] = self.sums[i].item() / count
        return out


def clock_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressDisplay:
    """The progress observer (see the module's docstring); `stream` defaults to stderr."""

    def __init__(
        self,
        plan: RunPlan,
        names: Sequence[str],
        clock: RunClock,
        every_s: float,
        stream: TextIO,
    ) -> None:
        self.plan, self.names, self.clock, self.every_s = plan, list(names), clock, every_s
        self.stream = stream
        self.losses = RunningCrossEntropy()
        self.bar: Any = None  # the live bar of the current epoch, on a terminal
        self.epoch = -1
        self.live = is_terminal(stream)
        self.first_step_at: float | None = None
        self.steps_since_first = 0
        now = time.monotonic()
        self.window_start, self.window_samples = now, 0
        self.next_line = self.next_record = now + every_s
        self.next_refresh = now

    def wants_batch_stats(self, step: int) -> bool:
        return False

    def on_step(self, event: StepEvent) -> None:
        now = time.monotonic()
        if event.epoch != self.epoch:
            self._new_epoch(event)
        if self.first_step_at is None:
            self.first_step_at = now
        else:
            self.steps_since_first += 1
        self.window_samples += event.batch_size * self.plan.replicas
        self.losses.add(event.received, event.target)
        if now >= self.next_record:
            self.clock.record(event.step + 1)
            self.next_record = now + self.every_s
        if self.live:
            self._draw_bar(event, now)
        elif now >= self.next_line:
            say(f"progress: {self._figures(event, now)}", self.stream)
            self.next_line = now + self.every_s

    def on_eval(self, event: EvalEvent) -> None:
        self._close_bar()
        self.clock.record(event.step)

    def on_end(self, summary: dict[str, Any]) -> None:
        self._close_bar()
        self.clock.record(int(summary.get("steps", 0)))

    # -- drawing ----------------------------------------------------------------------------

    def _new_epoch(self, event: StepEvent) -> None:
        self._close_bar()
        self.epoch = event.epoch
        self.losses.reset()
        if self.live:
            from tqdm import tqdm

            total = self.plan.steps_in_epoch(event.epoch)
            self.bar = tqdm(
                total=total,
                initial=event.step - event.epoch * self.plan.per_epoch,
                desc=f"epoch {event.epoch + 1}/{self.plan.epochs}",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                mininterval=BAR_REFRESH_S / 2,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",
            )

    def _draw_bar(self, event: StepEvent, now: float) -> None:
        if now >= self.next_refresh:
            self.bar.set_postfix_str(self._figures(event, now, with_steps=False), refresh=False)
            self.next_refresh = now + BAR_REFRESH_S
        self.bar.update(1)
        if event.step + 1 - event.epoch * self.plan.per_epoch >= self.bar.total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _figures(self, event: StepEvent, now: float, with_steps: bool = True) -> str:
        """The figures of a progress report; restarts the samples-per-second window."""
        parts = []
        if with_steps:
            in_epoch = event.step + 1 - event.epoch * self.plan.per_epoch
            parts += [
                f"epoch {event.epoch + 1}/{self.plan.epochs}",
                f"step {in_epoch}/{self.plan.steps_in_epoch(event.epoch)}",
                f"(run {event.step + 1}/{self.plan.max_steps})",
            ]
        span = now - self.window_start
        if span > 0:
            parts.append(f"{self.window_samples / span:.0f} {self.plan.unit}/s")
        self.window_start, self.window_samples = now, 0
        ce = self.losses.means()
        if ce:
            parts.append("ce " + " ".join(f"{self.names[i]} {v:.3f}" for i, v in ce.items()))
        parts.append(f"elapsed {clock_text(self.clock.elapsed())}")
        parts.append(f"eta {self._eta(event, now)}")
        return "  ".join(parts)

    def _eta(self, event: StepEvent, now: float) -> str:
        """Remaining steps at this attempt's pace so far (evaluations and checkpoints included)."""
        if self.first_step_at is None or self.steps_since_first == 0:
            return "?"
        per_step = (now - self.first_step_at) / self.steps_since_first
        return clock_text(per_step * (self.plan.max_steps - event.step - 1))
