"""The process's global random generators, as saved with every checkpoint file.

Each peer draws from a stream of its own (dml_cluster.streams, saved per peer); these are the
process-wide generators that stand outside every peer's stream: Python's, numpy's, torch's CPU
and CUDA default generators between the peers' turns. Nothing in a training step draws from
them; they are restored so that whatever a user's code draws outside a peer's step resumes too.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """Python's, numpy's, torch's and CUDA's global RNG states, as tensors and plain types."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss,
        },
        "numpy": {
            "kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global generators to a state `capture_rng` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    keys = npy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        for device, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, device)
