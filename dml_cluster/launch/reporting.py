"""Which process of a cohort reports an error: one line from one process, the same exit status
from all, and the process whose failure caused the others' given time to exit first."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from dml_cluster.control import Control, Topic
from dml_cluster.errors import DmlError, ReportedElsewhere
from dml_cluster.signals import local_reporter

T = TypeVar("T")

CAUSE_GRACE_S = 3.0
"""How long a peer that lost its cohort waits before exiting, next to other local peers."""
AGENT_NOTICE_S = 1.0
"""After a sibling worker has exited, how long the survivor still waits: torchrun's agent polls
its workers (every 0.2 s as dml-cluster starts it) and names the first failure it records, by
whole-second timestamps; exiting in the same poll as the cause would make the survivor the
reported failure."""


@contextlib.contextmanager
def reported_once(kind: type[DmlError] = DmlError) -> Iterator[None]:
    """For errors every peer process meets alike (its config, the cohort's layout; `kind`: only
    those of this type, e.g. the bad image all peers read in the same step): local rank 0
    reports it; the others let it exit first, then exit with the same status, quietly."""
    try:
        yield
    except kind as err:
        if local_reporter():
            raise
        let_the_cause_exit_first()
        raise ReportedElsewhere(err.exit_code) from None


def together(control: Control, topic: Topic, rank: int, attempt: Callable[[], T]) -> T:
    """Every process makes `attempt`, then the cohort compares notes: when any met an error a
    user can act on, the first such process reports it and every process exits with its
    status, the others quietly. Every process gets there: no one waits alone."""
    refusal: DmlError | None = None
    result: Any = None
    try:
        result = attempt()
    except DmlError as err:
        refusal = err
    note = f"{refusal.exit_code} {refusal}" if refusal is not None else ""
    notes = control.all_gather_bytes(topic, 0, note.encode())
    refused = [i for i, theirs in enumerate(notes) if theirs]
    if refusal is not None and refused[0] == rank:
        raise refusal
    if refused:
        code = notes[refused[0]].split(b" ", 1)[0]
        let_the_cause_exit_first()
        raise ReportedElsewhere(int(code) if code.isdigit() else 1)
    return result


def let_the_cause_exit_first() -> None:
    """A lost cohort is mostly the consequence of another peer's failure. Next to other workers
    of one torchrun agent, give that peer time to exit first (up to CAUSE_GRACE_S), so the
    launcher reports the cause and its exit code: the wait ends as soon as one of the agent's
    workers has exited (a killed peer has gone already; a peer reporting a config error goes
    first)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if workers <= 1:
        return
    deadline = time.monotonic() + CAUSE_GRACE_S
    while time.monotonic() < deadline:
        running = _running_workers()
        if running is not None and running < workers:
            time.sleep(min(AGENT_NOTICE_S, max(0.0, deadline - time.monotonic())))
            return
        time.sleep(0.02)


def _running_workers() -> int | None:
    """How many children of this process's parent (the agent's workers, this one among them)
    are still running; None where /proc cannot tell (then the grace is waited in full)."""
    parent = os.getppid()
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
        children = {
            int(pid)
            for task in tasks
            for pid in Path(f"/proc/{parent}/task/{task}/children").read_text().split()
        }
    except (OSError, ValueError):
        return None
    running = 0
    for pid in children:
        try:  # the state follows the command's name, which is in parentheses
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # reaped meanwhile
        running += state not in ("Z", "X")  # a zombie has exited, not yet reaped
    return running
