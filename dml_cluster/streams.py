"""Each peer's own random stream.

torch draws dropout masks, drop-path decisions and every other random number of a training
forward from its process-global default generators: the CPU's and one per CUDA device. Peers
that share a process (the one-process engine) would take turns on one stream, peers in processes
of their own would each have one, and a cohort of models with dropout would train different
numbers in different layouts. So every peer owns a stream, seeded by (run.seed, peer index) and
nothing else, and every draw made on its behalf (its training forward, its method's loss and
extra modules, its backward and optimizer step, the sequential update's refresh forward) happens
inside `with peer.stream:`. Entering swaps the peer's generator states into torch's default
generators (the CPU's and, for a peer on a GPU, its device's); leaving takes them back out and
restores what was there. Each swap is a get and a set of each state: a 5 KB host copy for the
CPU generator, 16 host bytes (seed and offset) for a CUDA one, no device synchronisation.

The data's order and augmentation come from generators of their own (dml_cluster.data.seeding),
not from these streams. Python's and numpy's global generators are not per peer: nothing in a
training step draws from them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dml_cluster.data.seeding import derive_seed

DOMAIN = "peer-stream"


def _seeded_state(device: torch.device, seed: int) -> Tensor:
    """The state of a fresh generator for `device` seeded with `seed` (torch's format)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator.get_state()


class PeerStream:
    """One peer's random stream: a CPU generator state and, on CUDA, its device's.

    A context manager (re-entrant: an inner `with` of the same stream changes nothing).
    `state_dict` / `load_state_dict` carry it through checkpoints. `replica`: which of a
    data-parallel peer's processes draws from it (each its own masks for its own samples);
    replica 0 draws the stream of a peer in one process."""

    def __init__(self, seed: int, peer: int, device: torch.device, replica: int = 0) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        seed = derive_seed(DOMAIN, seed, peer, *((replica,) if replica else ()))
        self._cpu = _seeded_state(torch.device("cpu"), seed)
        self._cuda = _seeded_state(device, seed) if self.on_cuda else None
        self._outer: tuple[Tensor, Tensor | None] | None = None
        self._depth = 0

    def __enter__(self) -> PeerStream:
        self._depth += 1
        if self._depth == 1:
            outer_cuda = torch.cuda.get_rng_state(self.device) if self.on_cuda else None
            self._outer = (torch.get_rng_state(), outer_cuda)
            torch.set_rng_state(self._cpu)
            if self._cuda is not None:
                torch.cuda.set_rng_state(self._cuda, self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        assert self._outer is not None
        outer_cpu, outer_cuda = self._outer
        self._outer = None
        self._cpu = torch.get_rng_state()
        torch.set_rng_state(outer_cpu)
        if outer_cuda is not None:
            self._cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(outer_cuda, self.device)

    def state_dict(self) -> dict[str, Tensor]:
        """The stream's state: `cpu`, and `cuda` for a peer on a GPU (uint8 CPU tensors)."""
        if self._depth:
            raise RuntimeError("a peer's stream is saved outside its `with` block")
        state = {"cpu": self._cpu.clone()}
        if self._cuda is not None:
            state["cuda"] = self._cuda.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state. A state saved on the CPU has no `cuda` part: a peer now
        on a GPU keeps its device stream as seeded; one saved on a GPU and loaded on the CPU
        drops it."""
        if self._depth:
            raise RuntimeError("a peer's stream is loaded inside its `with` block")
        cpu = state["cpu"]
        if not isinstance(cpu, Tensor) or cpu.dtype != torch.uint8 or cpu.shape != self._cpu.shape:
            raise ValueError("its random stream is not a CPU generator state")
        self._cpu = cpu.cpu().clone()
        if self._cuda is not None and isinstance(state.get("cuda"), Tensor):
            self._cuda = state["cuda"].cpu().clone()
