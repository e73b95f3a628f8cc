"""One run at a time in a run folder: each process locks the folder for the peers it hosts.

A lock file per peer, `<run dir>/locks/peer-<index>.lock`, held with `flock(LOCK_EX | LOCK_NB)`
by the process that hosts that peer: the one-process engine locks every peer, a torchrun worker
its own. Peers are locked by index, not name, so any second run of the folder hosts a locked
peer whatever its config, and fails on it before it writes anything, with one line naming the
holder (the pid, host and start time the holder writes into its lock file). The OS drops a
flock when its process dies, so a killed run leaves no stale lock, only its lock file; a run
that ends removes its lock files (and `locks/` once empty), so the folder is left as it was.

Removing a lock file is safe because it happens only while its lock is held, and a process that
gets a lock checks that the file it locked is still the one at that path (else it tries again).
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
from dml_cluster.run_folder import (
    ensure_writable,
    missing_folders,
    not_writable,
    remove_if_empty,
)

LOCK_TRIES = 100
"""Attempts at a lock whose file other runs keep removing (each one ending as we start)."""

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
        self._created: set[Path] = set()  # by this process: removed again if it fails
        self._made = missing_folders(folder)  # removed again at release if still empty

    def acquire(self) -> None:
        """Take every lock or none: a held one raises `RunFolderInUse` and the run folder is
        left as it was. A held lock has a file, and existing files are tried first, so a run
        in use is found before any file is made (what is made on the way is removed again)."""
        existing_first = sorted(self.peers, key=lambda i: not lock_path(self.folder, i).exists())
        try:
            for index in existing_first:
                self._fds[index] = self._take(lock_path(self.folder, index))
        except BaseException:
            self._drop(remove=self._created)
            raise
        since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        for index, fd in self._fds.items():
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
            holder |= {"peer": self.peers[index], **_launcher()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        """Remove the lock files and let the locks go (safe to call twice)."""
        held = {lock_path(self.folder, index) for index in self._fds}
        self._drop(remove=held | {self.folder / "locks"})
        remove_if_empty(self._made)
        self._made = []

    def _take(self, path: Path) -> int:
        for _ in range(LOCK_TRIES):
            try:
                fd = self._open(path)
            except FileNotFoundError:
                continue  # removed by a run that just ended: make it again
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
            if _same_file(fd, path):
                return fd
            os.close(fd)  # its holder removed it as it ended: lock the file now at `path`
        raise DmlError(f"cannot lock {path}: it keeps being removed and made again")

    def _open(self, path: Path) -> int:
        """The lock file at `path`, made (with `locks/`) if missing; what it made is noted."""
        try:
            path.parent.mkdir(parents=True)
            self._created.add(path.parent)
        except FileExistsError:
            pass
        except OSError as err:  # FileNotFoundError too: a parent that cannot be made (/proc)
            raise not_writable(self.folder, err) from None
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return os.open(path, flags)
        self._created.add(path)
        return fd

    def _drop(self, remove: set[Path]) -> None:
        """Let the locks go, removing the files in `remove` while they are held, and `locks/`
        if it is in `remove` and empty."""
        while self._fds:
            index, fd = self._fds.popitem()
            if lock_path(self.folder, index) in remove:
                with contextlib.suppress(OSError):
                    lock_path(self.folder, index).unlink()
            os.close(fd)  # lets the lock go
        self._created.clear()
        if self.folder / "locks" in remove:
            with contextlib.suppress(OSError):  # not empty: another process's locks are there
                (self.folder / "locks").rmdir()


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), path.stat()
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


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
