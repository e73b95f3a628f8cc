"""Stopping on SIGINT / SIGTERM: one line from the process that reports, no traceback, exit
128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as shells and Kubernetes expect.

Who reports: the `--nproc` launcher for its peer processes (it sets `LAUNCHER_ENV` for them);
under a launcher of one's own (plain torchrun), the peer of local rank 0, once per node; a peer
started by hand (one per pod), or the one-process run, for itself. The others stop quietly with
the same status.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

LAUNCHER_ENV = "DML_CLUSTER_LAUNCHER"
"""Set by `dml-cluster train --nproc` in its peer processes: the launcher reports for them."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

HARD_STOP_S = 5.0
"""A process that has not stopped this long after the signal (its main thread held in a
blocking C++ call, where Python handlers cannot run) exits at once, with the same status."""

SIGNAL_AT_ENV = "DML_CLUSTER_TEST_SIGINT_AT"
"""Tests only: the phase (`signal_point`) at which this process sends SIGINT to its process
group once, as a terminal's Ctrl-C does, to interrupt every phase of a run deterministically."""

_watching = False
_hard_stop_after: dict[int, float] = {}  # a signal's own delay (a deferred SIGTERM's grace)
_owner = 0  # the process whose handlers these are (a forked child inherits them, not the role)
_held = 0  # depth of `held_stop` blocks: a stop signal waits for the block's end
_pending: int | None = None  # a stop signal that came inside one, or the one being stopped on
_signalled: set[str] = set()  # the test phases this process has signalled at
_terminal_group = 0  # tests: the process group a terminal's Ctrl-C would reach (0: our own)
_signal_seen = threading.Event()  # a stop signal reached this process (set by the watcher)

LOST_WORKER_WAIT_S = 1.0
"""How long a helper thread's lost connection waits to learn whether a stop signal caused it."""


class Interrupted(BaseException):
    """A stop signal reached this process. A BaseException, as KeyboardInterrupt is: no
    `except Exception` on the way stops it, every `finally` (bus, process group) still runs."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        super().__init__(message or signal_name(signum))
        self.signum = signum
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def local_reporter() -> bool:
    """Whether this peer process reports what every peer of this node meets alike (a signal
    from the terminal, a config error): local rank 0, or a process started without a launcher.
    """
    return os.environ.get("LOCAL_RANK", "0") == "0"


def reports_signals() -> bool:
    """Whether this process says it was stopped (the `--nproc` launcher speaks for its peers)."""
    return LAUNCHER_ENV not in os.environ and local_reporter()


def stop_on_signals() -> None:
    """From now on SIGINT / SIGTERM raise `Interrupted` once; later ones (the launcher passing
    the terminal's Ctrl-C on) are ignored, so that cleanup runs to its end; a process still
    there HARD_STOP_S later ends at once (a Python handler cannot run while C++ holds the main
    thread)."""

    global _owner, _terminal_group
    _owner = os.getpid()
    if os.environ.get(SIGNAL_AT_ENV) and "TORCHELASTIC_RUN_ID" in os.environ:
        _terminal_group = os.getpgid(os.getppid())  # torchrun's: each peer has a session
    for stop in STOP_SIGNALS:
        signal.signal(stop, _interrupted)
    sys.unraisablehook = _stop_again_if_swallowed(sys.unraisablehook)
    sys.excepthook = _quiet_about_stopped_workers(sys.excepthook)
    _watch_for_a_stuck_stop()


def _interrupted(signum: int, frame: FrameType | None) -> None:
    global _pending
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    if os.getpid() != _owner:  # a forked child (a loader worker before its own set-up): its
        return  # parent stops it; a traceback from here would be one more line
    _pending = signum
    if not _held:
        raise Interrupted(signum)


def stopping() -> int | None:
    """The stop signal this process received (it is on its way out), or None."""
    return _pending


@contextlib.contextmanager
def held_stop() -> Iterator[None]:
    """A stop signal arriving in the block is raised when it ends: for code whose interruption
    half-way leaves an object its clean-up cannot handle (a DataLoader starting or resuming its
    worker processes, whose `__del__` then fails with a traceback of its own)."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if not _held and _pending is not None and os.getpid() == _owner:
        raise Interrupted(_pending)


def _stop_again_if_swallowed(
    previous: Callable[[sys.UnraisableHookArgs], object],
) -> Callable[[sys.UnraisableHookArgs], object]:
    """The hook for exceptions Python cannot raise (in a `__del__`, a weakref callback): an
    `Interrupted` raised there would be printed as a traceback and lost, the process going on.
    It is raised again at the main thread's next step instead; anything else goes to `previous`.
    """

    def hook(unraisable: sys.UnraisableHookArgs) -> object:
        if not isinstance(unraisable.exc_value, Interrupted) or os.getpid() != _owner:
            return previous(unraisable)
        signum = unraisable.exc_value.signum
        signal.signal(signum, _interrupted)
        # from a bare thread (threading's start() would wait here, where the signal could land
        # again): the handler runs in the main thread once this hook has returned
        _thread.start_new_thread(os.kill, (os.getpid(), signum))
        return None

    return hook


def signal_point(phase: str) -> None:
    """Tests only: send SIGINT where a terminal's Ctrl-C goes (the launcher's process group
    under torchrun, else this process's) at `phase` the first time it is reached when
    `SIGNAL_AT_ENV` names it; of a cohort's processes only rank 0's, as one Ctrl-C."""
    if os.environ.get(SIGNAL_AT_ENV) != phase or phase in _signalled:
        return
    if os.environ.get("RANK", "0") != "0":
        return
    _signalled.add(phase)
    os.killpg(_terminal_group, signal.SIGINT)


def defer_sigterm(requested: Callable[[int], None], grace_s: float) -> None:
    """From now on SIGTERM calls `requested` (once; later ones are ignored) instead of stopping
    the process: the trainer stops at a step the cohort agrees on and saves there. The hard stop
    after a SIGTERM waits `grace_s` rather than HARD_STOP_S. SIGINT still stops at once."""

    def deferred(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        requested(signum)

    _hard_stop_after[signal.SIGTERM] = grace_s
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # not stopping already
        signal.signal(signal.SIGTERM, deferred)


def undefer_sigterm() -> None:
    """SIGTERM stops at once again (stop_on_signals), unless one has come already."""
    _hard_stop_after.pop(signal.SIGTERM, None)
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _interrupted)


def _quiet_about_stopped_workers(
    previous: Callable[..., object],
) -> Callable[..., object]:
    """multiprocessing's resource sharer (the thread that hands a DataLoader worker's tensors
    over) reports a worker's connection lost half-way through `sys.excepthook`, from its own
    thread. A Ctrl-C reaches the loader workers with the process group, so such a loss is the
    same signal's doing: dropped once the stop signal is seen here (waiting briefly for it, as
    the two arrive together); any other error, and this one without a signal, goes on."""

    def hook(kind: type[BaseException], value: BaseException, tb: object) -> object:
        lost = isinstance(value, (ConnectionError, EOFError))
        helper = threading.current_thread() is not threading.main_thread()
        if lost and helper and _signal_seen.wait(LOST_WORKER_WAIT_S):
            return None
        return previous(kind, value, tb)

    return hook


def _watch_for_a_stuck_stop() -> None:
    """The C-level signal handler writes the signal's number to the wakeup pipe at once, even
    while the main thread is held in C++ (joining a process group, a gloo collective); a thread
    that reads it ends the process HARD_STOP_S later if it is still there."""
    global _watching
    if _watching:
        return
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)

    def watch() -> None:
        # every signal with a Python handler is written here, not only the stop signals: the
        # SIGCHLD of a DataLoader worker that ends (torch installs a handler) must not stop us
        signum = os.read(wake_read, 1)[0]
        while signum not in STOP_SIGNALS:
            signum = os.read(wake_read, 1)[0]
        _signal_seen.set()
        time.sleep(_hard_stop_after.get(signum, HARD_STOP_S))
        if reports_signals():
            os.write(2, f"dml-cluster: stopped by {signal_name(signum)}\n".encode())
        os._exit(128 + signum)

    threading.Thread(target=watch, name="dml-cluster-stop-watch", daemon=True).start()
    _watching = True
