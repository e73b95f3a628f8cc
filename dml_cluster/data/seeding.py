"""Derivation of independent, reproducible random streams from integer coordinates."""

from __future__ import annotations

import hashlib
import struct

import torch


def derive_seed(domain: str, *parts: int) -> int:
    """A 63-bit seed that depends on `domain` and every integer in `parts` (order matters)."""
    h = hashlib.blake2b(domain.encode(), digest_size=8)
    for part in parts:
        h.update(struct.pack("<q", int(part)))
    return int.from_bytes(h.digest(), "little") >> 1


def seeded_generator(domain: str, *parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `derive_seed(domain, *parts)`."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(domain, *parts))
    return g
