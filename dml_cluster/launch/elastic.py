"""Torch's elastic launcher (torchrun) for `dml-cluster train --nproc K`: K peer processes on
this node, and the one line that explains a failed or stopped cohort."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dml_cluster.errors import ConfigError, DmlError, PeerError, ReportedElsewhere
from dml_cluster.run_folder import missing_folders, remove_if_empty
from dml_cluster.signals import LAUNCHER_ENV, signal_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _root_cause(err: Any) -> tuple[int, Any]:
    """The failure that explains the others: a peer that lost its cohort (200) or was stopped by
    the launcher (SIGTERM) is a consequence; the earliest other failure is the cause."""
    consequences = {PeerError.exit_code, -signal.SIGTERM, 128 + signal.SIGTERM}
    causes = {r: f for r, f in err.failures.items() if f.exitcode not in consequences}
    pool = causes or err.failures
    rank = min(pool, key=lambda r: pool[r].timestamp)
    return rank, pool[rank]


def launch_elastic(
    config: str,
    overrides: list[str],
    nproc: int,
    max_restarts: int = 0,
    wait_s: int = 30,
    run_dir: Path | None = None,
) -> int:
    """Start `nproc` peer processes with torch.distributed.run (torchrun), one node, c10d store.

    An explicit c10d endpoint (not --standalone) keeps restarts working with gloo
    (pytorch/pytorch#135712). Returns the exit code to use. `wait_s`: how long the launcher
    waits for the peers after passing a SIGTERM on (their checkpoint save) before killing them.
    `run_dir`: the run folder; when the peers made it and left it empty, it is removed.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = [
        f"--nproc-per-node={nproc}", "--nnodes=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}", f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2", "-m", "dml_cluster", "train", config,
    ]  # fmt: skip
    for item in overrides:
        argv += ["--set", item]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(wait_s))
    # a fresh worker store for every restart: keys left by the failed attempt in a shared store
    # break the restarted group's gloo set-up (pytorch/pytorch#135712)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ[LAUNCHER_ENV] = "1"  # the peers stop quietly on a signal: this process says it
    made = missing_folders(run_dir) if run_dir is not None else []
    log = _CohortLog(run_dir)
    try:
        with _quiet_signal_relay():
            run(get_args_parser().parse_args(argv))
    except SignalException as err:
        # torch's agent has stopped the peers (the same signal, then SIGKILL after a timeout)
        saved = log.preempted_at() if err.sigval == signal.SIGTERM else None
        stopped = DmlError(
            f"stopped by {signal_name(err.sigval)}; the peers were stopped too (run the same "
            "command again to resume from the last complete checkpoint)"
            if saved is None
            else f"stopped by SIGTERM; the peers saved a complete checkpoint at step {saved} "
            "and stopped (run the same command again to resume from there)"
        )
        stopped.exit_code = 128 + err.sigval
        raise stopped from None
    except ChildFailedError as err:
        rank, failure = _root_cause(err)
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        error = PeerError(f"peer process rank {rank} failed with exit code {code}")
        sigterm = {128 + signal.SIGTERM, -signal.SIGTERM}  # a peer's own exit, or the agent's
        if code == 128 + signal.SIGTERM and {f.exitcode for f in err.failures.values()} <= sigterm:
            saved = log.preempted_at()
            where = "where the cohort stopped " if saved is None else f"at step {saved} "
            error = PeerError(
                f"the peers stopped on SIGTERM (exit {code}), and saved a complete checkpoint "
                f"{where}(checkpoint.on_signal): run the same command again to resume"
            )
        error.exit_code = code
        if code == ConfigError.exit_code:  # a permanent error: the peer has said it in one line
            raise ReportedElsewhere(code) from None
        raise error from None
    finally:
        os.environ.pop(LAUNCHER_ENV, None)
        remove_if_empty(made)
    return 0


class _CohortLog:
    """The run's cohort log (`cohort.jsonl`, written by peer 0) from where it ends at launch:
    what this launch's peers recorded there."""

    def __init__(self, run_dir: Path | None) -> None:
        self.path = None if run_dir is None else run_dir / "cohort.jsonl"
        self.start = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size if self.path is not None else 0
        except OSError:
            return 0

    def preempted_at(self) -> int | None:
        """The step this launch's cohort saved at when it stopped on SIGTERM (its `preempted`
        record), or None when it recorded none."""
        if self.path is None or self._size() <= self.start:
            return None
        with self.path.open("rb") as f:
            f.seek(self.start)
            lines = f.read().decode(errors="replace").splitlines()
        steps = []
        for line in lines:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == "preempted":
                    steps.append(int(record["step"]))
        return steps[-1] if steps else None


_ELASTIC_LOGGERS = (
    "torch.distributed.elastic.agent.server.api",
    "torch.distributed.elastic.multiprocessing.api",
)


class _NoSignalRelay(logging.Filter):
    """Drops torch elastic's lines about passing a stop signal on to each peer (the launcher
    says it in one line) and about a peer that exited 2 (it said why in one line). Its lines
    about a peer that crashed or had to be killed stay."""

    RELAY = ("death signal, shutting down workers", "closing signal", "Closing process")
    REPORTED = f"failed (exitcode: {ConfigError.exit_code})"  # the peer's own line says why

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.RELAY) and self.REPORTED not in message


@contextlib.contextmanager
def _quiet_signal_relay() -> Iterator[None]:
    relay = _NoSignalRelay()
    for name in _ELASTIC_LOGGERS:
        logging.getLogger(name).addFilter(relay)
    try:
        yield
    finally:
        for name in _ELASTIC_LOGGERS:
            logging.getLogger(name).removeFilter(relay)
