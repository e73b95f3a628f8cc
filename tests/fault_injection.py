"""Faults injected into real runs at fixed points, from the tests only (nothing in the package
knows of them).

`DML_CLUSTER_FAULT=die-saving:<peer>:<step>[:<run name>]` in the environment of a process that
runs `arm_from_environment()` (tests/cohort_runs.py does, in the one-process engine and in every
torchrun peer process) makes the process hosting that peer write half of its checkpoint file of
that step (in that run, if named) and SIGKILL itself, in the first attempt of a torchrun group
only, so a restarted group runs through. Half a file: a temporary one, as an interrupted atomic
write leaves it.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

FAULT_ENV = "DML_CLUSTER_FAULT"


def arm_from_environment() -> None:
    """Arm the fault FAULT_ENV names, if any (a malformed one is an error)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, peer, step, *run = spec.split(":")
    if kind != "die-saving" or len(run) > 1:
        raise ValueError(f"{FAULT_ENV}: not a fault: {spec!r}")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        die_saving(peer, int(step), run[0] if run else None)


def die_saving(peer: str, step: int, run: str | None = None) -> None:
    """Replace the checkpoint's peer-file writer by one that dies half-way through writing the
    file of `peer` at `step` (of the run called `run`, or of any), as a peer killed while saving
    would."""
    from dml_cluster.checkpoint import files

    write = files.write_peer_file

    def dying(path: Path, data: bytes | memoryview) -> bytes:
        # <out_dir>/<run>/checkpoints/step-N/<peer>.pt
        of_run = run is None or path.parents[2].name == run
        if path.stem == peer and path.parent.name == files.step_name(step) and of_run:
            with tempfile.NamedTemporaryFile(
                dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
            ) as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, data)

    files.write_peer_file = dying
