"""The zmq wire format: a fixed binary header, then the raw payload bytes. No pickle, ever.

Header (little-endian, 56 bytes):

    magic 4s | version B | kind B | encoding B | reserved B | run_id 8s | step Q | round I |
    sender_rank I | sender_peer I | reserved I | fingerprint Q | rows I | cols I

Kinds: HELLO (the handshake: the config hash in `fingerprint`), DATA (predictions [rows, cols]
for a step and round) and CREDIT (flow control: the receiver has consumed every message of steps
up to `step`; no payload). Every field is checked before the payload is used; anything wrong
raises `WireError` with a reason, which the bus counts and drops (or, for a wrong fingerprint at
the current step, turns into a "peers out of sync" error).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from torch import Tensor

from dml_cluster.bus.encoding import from_wire, to_wire

MAGIC = b"DMLC"
VERSION = 1
HEADER = struct.Struct("<4sBBBB8sQIIIIQII")


class Kind(IntEnum):
    HELLO = 1
    DATA = 2
    CREDIT = 3


ENCODINGS: dict[int, torch.dtype] = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16}
ENCODING_IDS = {"float32": 1, "float16": 2, "bfloat16": 3}


class WireError(ValueError):
    """A message that cannot be used; the reason is in the message."""


@dataclass(frozen=True)
class Header:
    kind: Kind
    encoding: int
    run_id: bytes
    step: int
    round: int
    sender_rank: int
    sender_peer: int
    fingerprint: int
    rows: int
    cols: int

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, VERSION, self.kind, self.encoding, 0, self.run_id, self.step, self.round,
            self.sender_rank, self.sender_peer, 0, self.fingerprint, self.rows, self.cols,
        )  # fmt: skip

    @property
    def payload_bytes(self) -> int:
        return self.rows * self.cols * ENCODINGS[self.encoding].itemsize


def unpack_header(raw: bytes | memoryview) -> Header:
    if len(raw) != HEADER.size:
        raise WireError(f"header of {len(raw)} bytes, expected {HEADER.size}")
    (magic, version, kind, encoding, _, run_id, step, rnd, rank, peer, _, fp, rows, cols) = (
        HEADER.unpack(raw)
    )
    if magic != MAGIC:
        raise WireError("bad magic (not a dml-cluster message)")
    if version != VERSION:
        raise WireError(f"wire format version {version}, this peer speaks {VERSION}")
    if kind not in set(Kind):
        raise WireError(f"unknown message kind {kind}")
    if encoding not in ENCODINGS:
        raise WireError(f"unknown encoding {encoding}")
    if kind != Kind.DATA and (rows or cols):
        raise WireError(f"a {Kind(kind).name} message with a {rows}x{cols} payload")
    return Header(Kind(kind), encoding, run_id, step, rnd, rank, peer, fp, rows, cols)


def wire_dtype(encoding: str) -> torch.dtype:
    """The dtype a bus.encoding puts on the wire (its id's dtype)."""
    return ENCODINGS[ENCODING_IDS[encoding]]


def encode(tensor: Tensor, encoding: str) -> tuple[int, Tensor]:
    """The payload tensor to send (contiguous, on the CPU) and its encoding id."""
    eid = ENCODING_IDS[encoding]
    return eid, to_wire(tensor, encoding).cpu().contiguous()


def decode(header: Header, payload: memoryview | bytes, pinned: bool = False) -> Tensor:
    """The [rows, cols] tensor a validated message carries (a copy, safe to keep): float32, or
    with `pinned` the wire dtype in page-locked memory, copied there once from the message (the
    device converts it after the upload: `staging.to_device`)."""
    if len(payload) != header.payload_bytes:
        raise WireError(
            f"payload of {len(payload)} bytes, header says {header.rows}x{header.cols} "
            f"({header.payload_bytes} bytes)"
        )
    dtype = ENCODINGS[header.encoding]
    raw = torch.empty(header.payload_bytes, dtype=torch.uint8, pin_memory=pinned)
    if header.payload_bytes:
        raw.numpy()[:] = np.frombuffer(payload, dtype=np.uint8)  # the one copy
    received = raw.view(dtype).view(header.rows, header.cols)
    return received if pinned else from_wire(received)
