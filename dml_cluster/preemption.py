"""Preemption: on SIGTERM (Kubernetes evicting a pod, Slurm's preemption, the launcher passing
it on) every peer finishes its step, the cohort saves a complete checkpoint at one agreed step
and every process exits with 143 (128 + SIGTERM), which a retrying launcher restarts:
Kubernetes' `restartPolicy: ExitCode` (128-255), torchrun's --max-restarts, Slurm's --requeue.
The next run resumes from that checkpoint, bitwise as if never stopped.

Agreeing on the step: the signal may reach one peer only. The first process that sees a SIGTERM
after a step proposes a stop step in the rendezvous store (first proposal wins, compare-and-set):
at least `margin` steps later, rounded up to a multiple of `CHECK_EVERY`. Every process reads the
store only after such steps (a network round trip every step would cost a fast step ~60 µs,
benchmarks/stop_check.py), so each sees the proposal before passing the step it names: students
run at most one step apart, a teacher at most `bus.window` ahead, and the proposal is in the
store before any peer can complete a step `margin` later. A SIGTERM reaching this process is a
local flag, checked every step for free. The one-process run stops after the step it is in.
"""

from __future__ import annotations

import math
import signal
from typing import TYPE_CHECKING

from dml_cluster.config import Config
from dml_cluster.signals import Interrupted, defer_sigterm, undefer_sigterm

if TYPE_CHECKING:
    import torch.distributed as dist


CHECK_EVERY = 8
"""Steps between reads of the store for a stop step: stop steps are multiples of it."""


class Preempted(Interrupted):
    """The cohort stopped on SIGTERM after saving a complete checkpoint at `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(
            signal.SIGTERM,
            f"SIGTERM: saved a complete checkpoint at step {step} (exit {128 + signal.SIGTERM}, "
            "retryable: run the same command again to resume from there)",
        )
        self.step = step


class CohortStop:
    """Where the cohort stops after a SIGTERM. `store`: the rendezvous store the cohort's
    processes share (None: this process is the whole cohort); `key`: unique to this launch."""

    def __init__(
        self, cfg: Config, store: dist.Store | None = None, key: str = "", margin: int = 1
    ) -> None:
        settings = cfg.checkpoint.on_signal
        self.enabled = settings.save and cfg.checkpoint.enabled
        self.grace_s = settings.grace_s
        self.store, self.key = store, key
        self.margin = margin if store is not None else 0
        self.signalled = False
        self.stop_at: int | None = None

    def arm(self) -> None:
        """From now on a SIGTERM asks the cohort to stop and save (when checkpoints are on)."""
        if self.enabled:
            defer_sigterm(self._requested, self.grace_s)

    def disarm(self) -> None:
        """SIGTERM stops at once again; after a stop, on the way out, it is ignored (the
        launcher passing it on to a process that is already stopping)."""
        if not self.enabled:
            return
        if self.stop_at is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            undefer_sigterm()

    def _requested(self, signum: int) -> None:
        self.signalled = True

    def after(self, steps_done: int) -> bool:
        """Called by every process after every step: whether the cohort stops here."""
        if not self.enabled:
            return False
        if self.stop_at is None:
            self.stop_at = self._agreed(steps_done)
        return self.stop_at is not None and steps_done >= self.stop_at

    def _agreed(self, steps_done: int) -> int | None:
        if self.store is None:
            return steps_done if self.signalled else None
        if self.signalled:
            at = -(-(steps_done + self.margin) // CHECK_EVERY) * CHECK_EVERY
            return int(self.store.compare_set(self.key, b"", str(at).encode()))
        if steps_done % CHECK_EVERY == 0 and self.store.check([self.key]):
            return int(self.store.get(self.key))
        return None


def stop_margin(cfg: Config) -> int:
    """Steps between a proposal and the stop: a teacher under zmq may be `bus.window` steps
    ahead of the peer that proposes; students are at most one step apart."""
    teachers = any(p.role == "teacher" for p in cfg.peers)
    return 1 + (cfg.bus.window if teachers and cfg.bus.transport == "zmq" else 0)


LAUNCHER_MARGIN_S = 5


def launcher_wait_s(cfg: Config) -> int:
    """How long torch's elastic agent (our --nproc launcher, torchrun in a pod) waits for its
    peer processes after passing a SIGTERM on, before it kills them: the save's grace and a
    margin (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; its default, 30 s, would cut a longer grace)."""
    return math.ceil(cfg.checkpoint.on_signal.grace_s) + LAUNCHER_MARGIN_S
