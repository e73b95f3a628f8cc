"""How predictions are encoded for the bus: the one definition every transport uses, the
in-process one included, so that a cohort trains the same numbers in every layout.

A dense encoding rounds each float32 log-probability to its wire dtype (`to_wire`); a receiver
reads it back as float32 (`from_wire`). The sparse encodings send rows of
dml_cluster/sparse_rows.py: `topk` each row's k most likely classes (`bus.k`), `sampled`
`bus.samples` ids drawn from each row at the temperature its receivers distil at (1 for an
evaluation), seeded by (run.seed, step, round, peer) and the row; indices in the smallest
integer dtype that holds C, counts in the smallest that holds n, values in `bus.sparse_dtype`; a
receiver reads them widened (int64, float32). Every peer reads every exchanged prediction as it
travels (`Encoding.as_received`), its own included: the predictions a method learns from are the
same in one process and in a process per peer.

An exchange may be told an encoding of its own (`Bus.exchange(..., encoding=...)`; default: the
bus's): the trainer's evaluation travels as `FLOAT32` whatever `bus.encoding` is, so that it
scores the models' own predictions, not what a lossy wire would have made of them.

A message's payload is its tensors' bytes one after the other (`payload_parts`), read back by
`rows_from_bytes`: the zmq wire and the torch transport frame it with headers of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dml_cluster.bus.base import EVAL_ROUND, StepKey
from dml_cluster.sparse_rows import (
    Sampled,
    TopK,
    count_dtype,
    draw_key,
    encode_sampled,
    encode_topk,
    index_dtype,
)

DENSE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
SPARSE = ("topk", "sampled")
"""The sparse encodings."""

Sent = Tensor | TopK | Sampled
"""What an exchange carries per peer: dense [rows, C] log-probabilities or sparse rows."""


def wire_dtype(encoding: str) -> torch.dtype:
    """The dtype a dense `bus.encoding` puts on the wire."""
    return DENSE_DTYPES[encoding]


def to_wire(tensor: Tensor, encoding: str) -> Tensor:
    """`tensor`'s values as sent: detached, in the encoding's dtype, on its own device."""
    return tensor.detach().to(wire_dtype(encoding))


def from_wire(tensor: Tensor) -> Tensor:
    """A received payload as a receiver reads it: float32 (exact: every wire dtype widens)."""
    return tensor.float()


@dataclass(frozen=True)
class Encoding:
    """`bus.encoding` with its settings: `k` (topk), `samples` (sampled), `sparse_dtype` (both);
    for sampled also the run's `seed` and, by peer index, the temperature its receivers distil
    at (`temperatures`: the distribution its ids are drawn from; 1 for a peer not listed), and
    `first_row`: the row of its peer's whole batch that this process's training rows start at
    (a data-parallel replica's share: each row's ids are drawn as the whole batch draws them)."""

    name: str = "float32"
    k: int | None = None
    sparse_dtype: str = "bfloat16"
    samples: int | None = None
    seed: int = 0
    temperatures: tuple[float, ...] = ()
    first_row: int = 0

    @classmethod
    def of(cls, encoding: Encoding | str) -> Encoding:
        return encoding if isinstance(encoding, Encoding) else cls(encoding)

    @property
    def sparse(self) -> bool:
        return self.name in SPARSE

    @property
    def value_dtype(self) -> torch.dtype:
        """The dtype of the values on the wire (sparse: of the sent log-probabilities)."""
        return wire_dtype(self.sparse_dtype if self.sparse else self.name)

    def columns(self, classes: int) -> int:
        """The columns of a message carrying `classes`-class predictions: k (topk), n (sampled),
        C (dense)."""
        if self.name == "topk":
            return self.k
        if self.name == "sampled":
            return self.samples
        return classes

    def payload_size(self, rows: int, classes: int) -> int:
        """The payload bytes of `rows` rows of `classes`-class predictions under this encoding."""
        cols = self.columns(classes)
        return expected_bytes(self.name, rows, cols, classes, self.value_dtype)

    def temperature(self, key: StepKey, peer: int) -> float:
        """The temperature `peer`'s ids are drawn at for `key` (sampled): its receivers'; 1 for
        an evaluation round (which the trainer sends as `FLOAT32`: nothing is drawn there)."""
        if key.round >= EVAL_ROUND or peer >= len(self.temperatures):
            return 1.0
        return self.temperatures[peer]

    def send(self, tensor: Tensor, key: StepKey, peer: int) -> Sent:
        """What goes on the wire for `peer`'s [rows, C] log-probabilities `tensor` at `key`, on
        the tensor's device."""
        if self.name == "topk":
            return encode_topk(tensor.detach(), self.k, self.value_dtype)
        if self.name == "sampled":
            seed = draw_key(self.seed, key.step, key.round, peer)
            temperature = self.temperature(key, peer)
            first = self.first_row if key.round < EVAL_ROUND else 0  # evaluation: whole chunks
            return encode_sampled(
                tensor, self.samples, temperature, seed, self.value_dtype, first_row=first
            )
        return to_wire(tensor, self.name)

    def receive(self, sent: Sent) -> Sent:
        """What a receiver reads of `sent`: float32 values (int64 indices and counts)."""
        if isinstance(sent, (TopK, Sampled)):
            return sent.widened()
        return from_wire(sent)

    def as_received(self, tensor: Tensor, key: StepKey, peer: int) -> Sent:
        """`receive(send(tensor, key, peer))`, bit for bit what the transports deliver; for
        float32 the tensor itself (nothing changes)."""
        if self.name == "float32":
            return tensor
        return self.receive(self.send(tensor, key, peer))


FLOAT32 = Encoding("float32")
"""Dense float32 rows, bit for bit what a peer computed: the evaluation's encoding."""


def as_received(tensor: Tensor, encoding: Encoding | str, key: StepKey, peer: int) -> Sent:
    """`Encoding.as_received` for an encoding or its name."""
    return Encoding.of(encoding).as_received(tensor, key, peer)


def payload_parts(sent: Sent) -> list[Tensor]:
    """The tensors of a message's payload, in order: dense values; top-k indices, values;
    sampled indices, counts, values."""
    if isinstance(sent, TopK):
        return [sent.indices, sent.values]
    if isinstance(sent, Sampled):
        return [sent.indices, sent.counts, sent.values]
    return [sent]


def payload_bytes(sent: Sent) -> Tensor:
    """The payload as one flat uint8 tensor on `sent`'s device."""
    return torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in payload_parts(sent)])


def part_dtypes(name: str, cols: int, classes: int, value_dtype: torch.dtype) -> list[torch.dtype]:
    """The dtypes of a message's payload parts under encoding `name` (sparse: `cols` = k or n)."""
    if name == "topk":
        return [index_dtype(classes), value_dtype]
    if name == "sampled":
        return [index_dtype(classes), count_dtype(cols), value_dtype]
    return [value_dtype]


def rows_from_bytes(
    name: str, body: Tensor, rows: int, cols: int, classes: int, value_dtype: torch.dtype
) -> Sent:
    """The rows a flat uint8 payload `body` of encoding `name` holds, in their wire dtypes (not
    widened, not checked); each part a copy, aligned for its dtype. The caller checks `body`'s
    length (`expected_bytes`)."""
    parts, at = [], 0
    for dtype in part_dtypes(name, cols, classes, value_dtype):
        size = rows * cols * dtype.itemsize
        parts.append(body[at : at + size].clone().view(dtype).view(rows, cols))
        at += size
    if name == "topk":
        return TopK(parts[0], parts[1], classes)
    if name == "sampled":
        return Sampled(parts[0], parts[1], parts[2], classes)
    return parts[0]


def expected_bytes(name: str, rows: int, cols: int, classes: int, value_dtype: torch.dtype) -> int:
    """The payload bytes of a [rows, cols] message of encoding `name`."""
    return sum(rows * cols * d.itemsize for d in part_dtypes(name, cols, classes, value_dtype))
