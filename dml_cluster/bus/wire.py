"""The zmq wire format: a fixed binary header, then the raw payload bytes. No pickle, ever.

Header (little-endian, 56 bytes):

    magic 4s | version B | kind B | encoding B | values B | run_id 8s | step Q | round I |
    sender_rank I | sender_peer I | classes I | fingerprint Q | rows I | cols I

Encodings 1-3 are dense [rows, cols] float32 / float16 / bfloat16 (`values` and `classes` 0);
4 is top-k rows (dml_cluster/sparse_rows.py): `cols` = k, `classes` = C, `values` the dense id
of the kept log-probabilities' dtype; the payload is the [rows, k] indices (the smallest integer
dtype that holds C) then the [rows, k] values. 5 is sampled rows: `cols` = n (draws per row),
`classes` and `values` as for top-k; the payload is the [rows, n] distinct ids, the [rows, n]
counts (the smallest integer dtype that holds n) and the [rows, n] values. A sparse message with
k outside 1..C, an index outside 0..C-1, a negative count or a row whose counts do not add up
to n is refused like any other malformed message.

A receiver knows which encoding each exchange travels in (the bus's, or the one the exchange
was told: bus/base.py) and takes a DATA message only in that form (`check_form`: its encoding
id, values' dtype, k or n, classes and rows); any other is refused like a malformed one.

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

from dml_cluster.bus.encoding import (
    Encoding,
    Sent,
    expected_bytes,
    from_wire,
    payload_bytes,
    rows_from_bytes,
    to_wire,
)
from dml_cluster.sparse_rows import Sampled, TopK

MAGIC = b"DMLC"
VERSION = 1
HEADER = struct.Struct("<4sBBBB8sQIIIIQII")


class Kind(IntEnum):
    HELLO = 1
    DATA = 2
    CREDIT = 3


ENCODINGS: dict[int, torch.dtype] = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16}
ENCODING_IDS = {"float32": 1, "float16": 2, "bfloat16": 3}
TOPK = 4
"""The encoding id of top-k rows (their values' dtype: one of ENCODINGS, in `values`)."""
SAMPLED = 5
"""The encoding id of sampled rows (their values' dtype likewise)."""
SPARSE_IDS = {TOPK: "topk", SAMPLED: "sampled"}


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
    values: int = 0
    """Sparse rows: the encoding id of the values' dtype; 0 otherwise."""
    classes: int = 0
    """Sparse rows: the number of classes C; 0 otherwise."""

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, VERSION, self.kind, self.encoding, self.values, self.run_id, self.step,
            self.round, self.sender_rank, self.sender_peer, self.classes, self.fingerprint,
            self.rows, self.cols,
        )  # fmt: skip

    @property
    def sparse(self) -> str | None:
        """The sparse encoding's name ("topk", "sampled"), None for a dense one."""
        return SPARSE_IDS.get(self.encoding)

    @property
    def payload_bytes(self) -> int:
        if self.sparse:
            value_dtype = ENCODINGS[self.values]
            return expected_bytes(self.sparse, self.rows, self.cols, self.classes, value_dtype)
        return self.rows * self.cols * ENCODINGS[self.encoding].itemsize


def unpack_header(raw: bytes | memoryview) -> Header:
    if len(raw) != HEADER.size:
        raise WireError(f"header of {len(raw)} bytes, expected {HEADER.size}")
    (magic, version, kind, encoding, values, run_id, step, rnd, rank, peer, classes, fp, rows,
     cols) = HEADER.unpack(raw)  # fmt: skip
    if magic != MAGIC:
        raise WireError("bad magic (not a dml-cluster message)")
    if version != VERSION:
        raise WireError(f"wire format version {version}, this peer speaks {VERSION}")
    if kind not in set(Kind):
        raise WireError(f"unknown message kind {kind}")
    if encoding not in ENCODINGS and encoding not in SPARSE_IDS:
        raise WireError(f"unknown encoding {encoding}")
    if kind != Kind.DATA and (rows or cols):
        raise WireError(f"a {Kind(kind).name} message with a {rows}x{cols} payload")
    if encoding in SPARSE_IDS:
        name = "top-k" if encoding == TOPK else "sampled"
        if kind != Kind.DATA:
            raise WireError(f"a {Kind(kind).name} message with the {name} encoding")
        if values not in ENCODINGS:
            raise WireError(f"{name} values of unknown encoding {values}")
        if encoding == TOPK and not 0 < cols <= classes:
            raise WireError(f"top-k rows keeping {cols} of {classes} classes")
        if encoding == SAMPLED and not (cols > 0 and classes > 0):
            raise WireError(f"sampled rows of {cols} draws over {classes} classes")
    elif values or classes:
        raise WireError(f"a dense message with sparse fields (values {values}, classes {classes})")
    return Header(Kind(kind), encoding, run_id, step, rnd, rank, peer, fp, rows, cols, values,
                  classes)  # fmt: skip


def _form(encoding: int, values: int, cols: int, classes: int, rows: int | None) -> str:
    """A message's form in words: its encoding, values' dtype, columns, classes and rows."""
    ids = {v: k for k, v in ENCODING_IDS.items()}
    if encoding in SPARSE_IDS:
        what = f"{SPARSE_IDS[encoding]} ({cols} per row, {ids.get(values, values)} values"
        what += f", {classes} classes)"
    else:
        what = f"{ids.get(encoding, encoding)} ({cols} classes)"
    return what if rows is None else f"{what} x {rows} rows"


def check_form(
    header: Header, encoding: Encoding, rows: int | None = None, classes: int | None = None
) -> None:
    """Raise `WireError` unless the DATA message `header` is what `encoding` sends: its encoding
    id, values' dtype and columns (k, n or C) and, where the receiver knows them (it sends in
    the same exchange), its `rows` and `classes`."""
    ids = {v: k for k, v in ENCODINGS.items()}
    got_classes = header.classes if header.sparse else header.cols
    want_classes = got_classes if classes is None else classes
    if encoding.sparse:
        kind = TOPK if encoding.name == "topk" else SAMPLED
        want = (kind, ids[encoding.value_dtype], encoding.columns(want_classes), want_classes)
        got = (header.encoding, header.values, header.cols, header.classes)
    else:
        want = (ENCODING_IDS[encoding.name], 0, want_classes, 0)
        got = (header.encoding, header.values, header.cols, header.classes)
    want_rows = header.rows if rows is None else rows
    if got != want or header.rows != want_rows:
        raise WireError(
            f"a message of {_form(*got, header.rows)} for step {header.step} round "
            f"{header.round}, where this peer expects {_form(*want, want_rows)}"
        )


def wire_dtype(encoding: str) -> torch.dtype:
    """The dtype a bus.encoding puts on the wire (its id's dtype)."""
    return ENCODINGS[ENCODING_IDS[encoding]]


def encode(tensor: Tensor, encoding: str) -> tuple[int, Tensor]:
    """The payload tensor to send (contiguous, on the CPU) and its encoding id."""
    eid = ENCODING_IDS[encoding]
    return eid, to_wire(tensor, encoding).cpu().contiguous()


def encode_sent(sent: Sent) -> tuple[dict[str, int], Tensor]:
    """The header fields (encoding, rows, cols, values, classes) and the flat uint8 payload of
    what `Encoding.send` made, on the CPU."""
    ids = {v: i for i, v in ENCODINGS.items()}
    body = payload_bytes(sent).cpu()
    if isinstance(sent, (TopK, Sampled)):
        rows, cols = sent.indices.shape
        kind = TOPK if isinstance(sent, TopK) else SAMPLED
        fields = dict(encoding=kind, rows=rows, cols=cols, values=ids[sent.values.dtype],
                      classes=sent.num_classes)  # fmt: skip
        return fields, body
    rows, cols = sent.shape
    return dict(encoding=ids[sent.dtype], rows=rows, cols=cols), body


def decode_sparse(header: Header, payload: memoryview | bytes) -> TopK | Sampled:
    """The sparse rows a validated sparse message carries, checked (indices 0..C-1; sampled:
    counts >= 0 adding up to n a row) and widened."""
    if len(payload) != header.payload_bytes:
        raise WireError(
            f"payload of {len(payload)} bytes, header says {header.rows}x{header.cols} "
            f"{header.sparse} rows of {header.classes} classes ({header.payload_bytes} bytes)"
        )
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) else (
        torch.empty(0, dtype=torch.uint8))  # fmt: skip
    rows = rows_from_bytes(
        header.sparse, raw, header.rows, header.cols, header.classes, ENCODINGS[header.values]
    )
    if isinstance(rows, TopK):
        indices = rows.indices
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= header.classes):
            raise WireError(f"top-k index outside 0..{header.classes - 1}")
    else:
        try:
            rows.check()
        except ValueError as err:
            raise WireError(str(err)) from None
    return rows.widened()


def decode(header: Header, payload: memoryview | bytes, pinned: bool = False) -> Sent:
    """The [rows, cols] tensor a validated message carries (a copy, safe to keep): float32, or
    with `pinned` the wire dtype in page-locked memory, copied there once from the message (the
    device converts it after the upload: `staging.to_device`); sparse rows as `decode_sparse`."""
    if header.sparse:
        return decode_sparse(header, payload)
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
