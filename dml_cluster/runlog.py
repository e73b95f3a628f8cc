"""The run folder: JSONL logs (one per peer, one for the cohort), final weights, summary.json."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, TextIO

from dml_cluster.errors import DmlError


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


def ensure_writable(folder: Path) -> None:
    """Create the run folder if needed and prove it takes files, before anything is written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise DmlError(
            f"run folder {folder} is not writable ({err.strerror or err}): "
            f"choose another run.out_dir or fix its permissions"
        ) from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync, rename: readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]
