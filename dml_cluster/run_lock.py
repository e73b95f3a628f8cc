"""One run at a time in a run folder: each process locks the folder for the peers it hosts.

A lock file per peer, `<run dir>/locks/peer-<index>.lock`, held with `flock(LOCK_EX | LOCK_NB)`
by the process that hosts that peer: the one-process engine locks every peer, a torchrun worker
its own. Peers are locked by index, not name, so any second run of the folder hosts a locked
peer whatever its config, and fails on it before it writes anything, with one line naming the
holder (the pid, host and start time the holder writes into its lock file). The OS drops a
flock when its process dies, so a killed run leaves no stale lock; a clean exit empties the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from dml_cluster.errors import DmlError
from dml_cluster.run_folder import ensure_writable, not_writable

HOLDER_WAIT_S = 1.0
"""How long to wait for a holder that has its lock but has not written its pid yet."""


class RunFolderInUse(DmlError):
    """Another live run holds the run folder: permanent for this launch (1-127), not retried."""

    exit_code = 2


def lock_path(folder: Path, index: int) -> Path:
    return folder / "locks" / f"peer-{index}.lock"


class RunFolderLock:
    """The locks of the peers one process hosts in one run folder (`peers`: index -> name)."""

    def __init__(self, folder: Path, peers: Mapping[int, str]) -> None:
        self.folder = folder
        self.peers = dict(sorted(peers.items()))
        self._fds: dict[int, int] = {}

    def acquire(self) -> None:
        """Take every lock or none: a held one raises `RunFolderInUse` and changes no file."""
        try:
            for index in self.peers:
                self._fds[index] = self._take(lock_path(self.folder, index))
        except BaseException:
            self._drop(written=False)
            raise
        since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        for index, fd in self._fds.items():
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
            holder |= {"peer": self.peers[index], **_launcher()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        """Empty the lock files and let them go (safe to call twice)."""
        self._drop(written=True)

    def _take(self, path: Path) -> int:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise not_writable(self.folder, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderInUse(
                f"run folder {self.folder} is in use by another run ({_describe(path)}): "
                "wait for it to end, or choose another run.name"
            ) from None
        return fd

    def _drop(self, written: bool) -> None:
        while self._fds:
            _, fd = self._fds.popitem()
            with contextlib.suppress(OSError):
                if written:
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _launcher() -> dict[str, int]:
    """A torchrun worker's launcher (its parent): the process an operator would stop."""
    return {"launcher_pid": os.getppid()} if "TORCHELASTIC_RUN_ID" in os.environ else {}


def _describe(path: Path) -> str:
    """Who holds `path`, from what the holder wrote into it."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(path.read_text())
            text = f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
            if "launcher_pid" in holder:
                text += f", started by pid {holder['launcher_pid']}"
            return text
        if time.monotonic() > deadline:
            return f"holder unknown: {path} names none yet"
        time.sleep(0.05)


@contextlib.contextmanager
def claim_run_folder(folder: Path, peers: Mapping[int, str]) -> Iterator[RunFolderLock]:
    """Lock the hosted peers' files, then prove the folder takes files; let go at the end.

    Nothing but the lock files is written before the locks are held."""
    lock = RunFolderLock(folder, peers)
    lock.acquire()
    try:
        ensure_writable(folder)
        yield lock
    finally:
        lock.release()
