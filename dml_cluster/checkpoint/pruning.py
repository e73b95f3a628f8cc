"""Which step folders a run's checkpoint folder holds, which are complete, and removing steps."""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

from dml_cluster.checkpoint.files import MANIFEST

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_folders(root: Path) -> dict[int, Path]:
    """Every step folder under `root` (complete or torn), by step."""
    if not root.is_dir():
        return {}
    found = {}
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir():
            found[int(m.group(1))] = entry
    return found


def newest_complete(root: Path) -> int | None:
    """The newest step with a manifest, if any."""
    complete = [s for s, f in step_folders(root).items() if (f / MANIFEST).is_file()]
    return max(complete, default=None)


def remove_step(folder: Path) -> None:
    """Manifest first: a step half deleted is torn, never 'complete with files missing'."""
    with contextlib.suppress(OSError):
        (folder / MANIFEST).unlink()
    shutil.rmtree(folder, ignore_errors=True)


def prune(root: Path, newest: int, keep: int) -> None:
    """Keep the newest `keep` complete steps; drop older ones and torn ones older than
    `newest` (the step just saved)."""
    steps = step_folders(root)
    complete = sorted(s for s, f in steps.items() if (f / MANIFEST).is_file())
    kept = set(complete[-keep:])
    for step, folder in steps.items():
        if step < newest and step not in kept:
            remove_step(folder)


def remove_after(root: Path, step: int) -> None:
    """Remove every step after `step` (the one the cohort resumed from)."""
    for later, folder in step_folders(root).items():
        if later > step:
            remove_step(folder)
