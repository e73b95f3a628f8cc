"""How predictions are encoded for the bus: the one definition every transport uses, the
in-process one included, so that a cohort trains the same numbers in every layout.

A dense encoding rounds each float32 log-probability to its wire dtype (`to_wire`); a receiver
reads it back as float32 (`from_wire`). Every peer reads every exchanged prediction as it
travels (`as_received`), its own included: the predictions a method learns from and those the
evaluation scores are the same in one process and in a process per peer.
"""

from __future__ import annotations

import torch
from torch import Tensor

DENSE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def wire_dtype(encoding: str) -> torch.dtype:
    """The dtype a dense `bus.encoding` puts on the wire."""
    return DENSE_DTYPES[encoding]


def to_wire(tensor: Tensor, encoding: str) -> Tensor:
    """`tensor`'s values as sent: detached, in the encoding's dtype, on its own device."""
    return tensor.detach().to(wire_dtype(encoding))


def from_wire(tensor: Tensor) -> Tensor:
    """A received payload as a receiver reads it: float32 (exact: every wire dtype widens)."""
    return tensor.float()


def as_received(tensor: Tensor, encoding: str) -> Tensor:
    """What a receiver reads of `tensor` sent with `encoding`: `from_wire(to_wire(tensor))`,
    bit for bit what the transports deliver; for float32 the tensor itself (nothing changes)."""
    if wire_dtype(encoding) == torch.float32:
        return tensor
    return from_wire(to_wire(tensor, encoding))
