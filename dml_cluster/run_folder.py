"""The run folder: JSONL logs (one per peer, one for the cohort), final weights, summary.json;
writing them (atomically where a reader may look at any time) and reading the logs back."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from dml_cluster.errors import InputError


class JsonlLog:
    """Appends one JSON object per line; line-buffered so a crash loses at most one record.

    The file is opened at the first record, so a run that stops before logging anything (bad
    input) leaves the run folder as it found it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)
        self._file.write(json.dumps({"event": event, **fields}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def not_writable(folder: Path, err: OSError) -> InputError:
    """The one-line error for a run folder that cannot be created or written."""
    return InputError(
        f"run folder {folder} is not writable ({err.strerror or err}): "
        f"choose another run.out_dir or fix its permissions"
    )


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty: a run that stopped before it
    wrote anything leaves no trace of the folders made for it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def ensure_writable(folder: Path) -> None:
    """Create the run folder if needed and prove it takes files, before anything is written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise not_writable(folder, err) from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _file_mode() -> int:
    """What open() would give a new file (0o666 less the umask); mkstemp gives 0o600."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Temporary file in the same folder, fsync, rename, fsync the folder: all or nothing.

    Readers never see half a file, and the temporary name is unique, so processes sharing a
    folder may write the same file at once.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """`write_atomic` of indented JSON."""
    write_atomic(path, json.dumps(data, indent=2).encode())


CONFIG_FILE = "config.yaml"  # the run's resolved config, every default and --set applied


def record_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write the run's resolved config (`Config.to_dict()`) as `<run>/config.yaml`."""
    text = yaml.safe_dump(config, sort_keys=False)
    write_atomic(run_dir / CONFIG_FILE, text.encode())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log; an unfinished last line (a log still written) is skipped."""
    records = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise InputError(f"{path}:{number}: not a JSON record") from None
    return records


RENAMED_TRAIN_FIELDS = {"mimicry": "distill"}
"""Fields of a peer's training record that earlier versions wrote under another name: the old
name -> the one it has now (`LossParts.distill` was `mimicry`)."""


def train_record(record: dict[str, Any]) -> dict[str, Any]:
    """A peer's training record with its fields under this version's names: a run folder written
    before a rename reports and charts like a new one."""
    old = [name for name in RENAMED_TRAIN_FIELDS if name in record]
    if not old:
        return record
    record = dict(record)
    for name in old:
        record.setdefault(RENAMED_TRAIN_FIELDS[name], record.pop(name))
    return record


@dataclass
class RunLogs:
    """What a run folder's logs hold (see `report.load_run`)."""

    run_dir: Path
    evals: list[dict[str, Any]]
    train: dict[str, list[dict[str, Any]]]  # training records by peer name
    summary: dict[str, Any] | None = None
    peers: list[str] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)  # the logs' warning records

    @property
    def name(self) -> str:
        return (self.summary or {}).get("run", self.run_dir.name)

    @property
    def class_names(self) -> tuple[str, ...]:
        names = (self.summary or {}).get("class_names")
        if names:
            return tuple(str(n) for n in names)
        per_class = self.evals[-1]["peers"][self.peers[0]]["per_class"] if self.evals else []
        return tuple(str(i) for i in range(len(per_class)))


@dataclass(frozen=True)
class TimeSplit:
    """Mean seconds per step of one peer: compute, moving bytes, and waiting for others."""

    step: float
    compute: float
    transfer: float
    wait: float
    steps_logged: int


def time_split(records: list[dict[str, Any]]) -> TimeSplit | None:
    """Mean per-step time split of one peer's logged steps (None without timing records)."""
    rows = [r for r in records if "step_seconds" in r]
    if not rows:
        return None
    step = statistics.fmean(r["step_seconds"] for r in rows)
    exchange = statistics.fmean(r.get("exchange_seconds", 0.0) for r in rows)
    wait = statistics.fmean(r.get("step_wait_seconds", 0.0) for r in rows)
    wait = min(wait, exchange)
    return TimeSplit(step, max(step - exchange, 0.0), exchange - wait, wait, len(rows))
