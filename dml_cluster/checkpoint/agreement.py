"""The records a cohort's processes exchange over the control channel to agree on checkpoints:
a save confirmation (which peers' files are in place, with their digests) and a verification
verdict (whether a process's files of a step verify). Bytes in a fixed layout, checked on
arrival: a malformed record is a CheckpointError."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

from dml_cluster.errors import CheckpointError

_CONFIRMATION = struct.Struct("<IB32s")
"""One hosted peer in a save confirmation: its index, 1 if its file is in place, its sha256."""

_VERDICT = struct.Struct("<BI")
"""A process's verification report of a step: its verdict and first hosted peer; then why not
(UTF-8, at most MAX_REASON bytes)."""
VERIFIED, UNVERIFIED, REFUSED = 0, 1, 2
MAX_REASON = 2000


def confirmation(digests: Mapping[int, bytes | None]) -> bytes:
    """This process's save confirmation: a record per hosted peer (a zero digest: not saved)."""
    return b"".join(
        _CONFIRMATION.pack(i, d is not None, d or bytes(32)) for i, d in sorted(digests.items())
    )


def read_confirmations(
    messages: Sequence[bytes], step: int, names: Sequence[str]
) -> dict[int, bytes | None]:
    """Every peer's digest (None: its file is not in place), checked to cover the cohort of
    `names` exactly once."""
    everyone: dict[int, bytes | None] = {}
    for data in messages:
        if len(data) % _CONFIRMATION.size:
            raise CheckpointError(
                f"a confirmation of the checkpoint of step {step} is {len(data)} bytes long, "
                f"not a whole number of {_CONFIRMATION.size}-byte records"
            )
        for i, saved, digest in _CONFIRMATION.iter_unpack(data):
            if i >= len(names) or i in everyone or saved not in (0, 1):
                raise CheckpointError(
                    f"a confirmation of the checkpoint of step {step} is malformed "
                    f"(peer index {i}, flag {saved})"
                )
            everyone[i] = digest if saved else None
    missing = [names[i] for i in range(len(names)) if i not in everyone]
    if missing:
        raise CheckpointError(
            f"the checkpoint of step {step} was not confirmed for {', '.join(missing)}: "
            f"no process of the cohort reported it"
        )
    return everyone


def verdict(code: int, first: int, reason: str) -> bytes:
    """A process's verification report: VERIFIED, UNVERIFIED or REFUSED, its first hosted peer,
    and why (truncated to MAX_REASON bytes)."""
    return _VERDICT.pack(code, first) + reason.encode()[:MAX_REASON]


def read_verdict(data: bytes, step: int, size: int) -> tuple[int, int, str]:
    """(verdict, the process's first hosted peer, reason) from one verification report of a
    cohort of `size` peers."""
    if len(data) >= _VERDICT.size:
        code, first = _VERDICT.unpack_from(data)
        if code in (VERIFIED, UNVERIFIED, REFUSED) and first < size:
            return code, first, data[_VERDICT.size :].decode(errors="replace")
    raise CheckpointError(f"a verification report of the checkpoint of step {step} is malformed")
