"""How predictions are encoded for the bus: the one definition every transport uses, the
in-process one included, so that a cohort trains the same numbers in every layout.

A dense encoding rounds each float32 log-probability to its wire dtype (`to_wire`); a receiver
reads it back as float32 (`from_wire`). `topk` sends each row's k most likely classes
(bus/sparse.py): indices in the smallest integer dtype that holds C, values in
`bus.sparse_dtype`; a receiver reads them widened (int64, float32). Every peer reads every
exchanged prediction as it travels (`Encoding.as_received`), its own included: the predictions
a method learns from and those the evaluation scores are the same in one process and in a
process per peer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dml_cluster.bus.sparse import TopK, encode_topk

DENSE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

Sent = Tensor | TopK
"""What an exchange carries per peer: dense [rows, C] log-probabilities or top-k rows."""


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
    """`bus.encoding` with its settings (`k`, `sparse_dtype`: topk's)."""

    name: str = "float32"
    k: int | None = None
    sparse_dtype: str = "bfloat16"

    @classmethod
    def of(cls, encoding: Encoding | str) -> Encoding:
        return encoding if isinstance(encoding, Encoding) else cls(encoding)

    @property
    def sparse(self) -> bool:
        return self.name == "topk"

    @property
    def value_dtype(self) -> torch.dtype:
        """The dtype of the values on the wire (topk: of the kept log-probabilities)."""
        return wire_dtype(self.sparse_dtype if self.sparse else self.name)

    def send(self, tensor: Tensor) -> Sent:
        """What goes on the wire for [rows, C] log-probabilities `tensor`, on its device."""
        if self.sparse:
            return encode_topk(tensor.detach(), self.k, self.value_dtype)
        return to_wire(tensor, self.name)

    def receive(self, sent: Sent) -> Sent:
        """What a receiver reads of `sent`: float32 values (int64 indices)."""
        if isinstance(sent, TopK):
            return sent.widened()
        return from_wire(sent)

    def as_received(self, tensor: Tensor) -> Sent:
        """`receive(send(tensor))`, bit for bit what the transports deliver; for float32 the
        tensor itself (nothing changes)."""
        if self.name == "float32":
            return tensor
        return self.receive(self.send(tensor))


def as_received(tensor: Tensor, encoding: Encoding | str) -> Sent:
    """`Encoding.as_received` for an encoding or its name."""
    return Encoding.of(encoding).as_received(tensor)
