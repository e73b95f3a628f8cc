"""Where each peer runs: the peer -> device mapping and the process group's backend.

A peer has a *slot* on its node: its process's local rank under torchrun (one peer per process),
its index in the one-process engine. Without `cohort.devices`, slot s runs on GPU s % n of the
node's n visible GPUs (one peer per GPU when there are enough, round-robin sharing when there
are more peers than GPUs), or on the CPU when there is none. `cohort.devices` names a device per
peer instead: 'cuda:N', 'cpu', or 'cuda' (the peer's round-robin GPU).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from dml_cluster.config import Config
from dml_cluster.errors import ConfigError

K = TypeVar("K")


def on_one_device(tensors: Mapping[K, Tensor], device: torch.device | str) -> dict[K, Tensor]:
    """Tensors of different peers, every one on `device` (those already there are not copied).

    The one rule for every place where peers' tensors meet (a stack, a sum, a comparison): the
    one-process engine puts its peers on different GPUs, and torch refuses to combine tensors of
    two devices. Callers name the device they combine on."""
    device = torch.device(device)
    return {k: t if t.device == device else t.to(device) for k, t in tensors.items()}


def all_on(tensors: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """`on_one_device` for a sequence."""
    return list(on_one_device(dict(enumerate(tensors)), device).values())


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def slot_device(slot: int, gpus: int, wanted: str | None = None) -> torch.device:
    """The device of the peer in `slot` on a node with `gpus` GPUs (`wanted`: its
    cohort.devices entry, if any)."""
    if wanted is None:
        return torch.device("cuda", slot % gpus) if gpus else torch.device("cpu")
    if wanted == "cpu":
        return torch.device("cpu")
    if not gpus:
        raise ConfigError(f"config error: cohort.devices: {wanted!r} asked for, but no CUDA GPU")
    index = int(wanted.partition(":")[2] or slot % gpus)
    if index >= gpus:
        raise ConfigError(
            f"config error: cohort.devices: {wanted!r} asked for, but this node has {gpus} GPU(s)"
        )
    return torch.device("cuda", index)


def peer_slots(hosted: Sequence[int], local_rank: int) -> dict[int, int]:
    """The slot of each hosted peer: the local rank for a process hosting one peer under a
    launcher, the peer index in the one-process engine (both 0 for a cohort of one)."""
    if len(hosted) == 1:
        return {hosted[0]: local_rank}
    return {i: i for i in hosted}


def hosted_devices(
    cfg: Config, hosted: Sequence[int], local_rank: int = 0, gpus: int | None = None
) -> dict[int, torch.device]:
    """The device of every peer this process hosts."""
    gpus = visible_gpus() if gpus is None else gpus
    wanted = cfg.cohort.devices
    return {
        i: slot_device(slot, gpus, wanted[i] if wanted else None)
        for i, slot in peer_slots(hosted, local_rank).items()
    }


def cohort_device_type(cfg: Config, gpus: int | None = None) -> str:
    """'cuda' when any peer of the cohort runs on a GPU, else 'cpu' (before any peer is built:
    decides the determinism mode and the backend alike in every process)."""
    gpus = visible_gpus() if gpus is None else gpus
    wanted = cfg.cohort.devices
    if wanted is not None:
        return "cuda" if gpus and any(w != "cpu" for w in wanted) else "cpu"
    return "cuda" if gpus else "cpu"


def process_group_backend(cfg: Config, local_world: int, gpus: int | None = None) -> str:
    """'nccl' when every peer process has a GPU of its own on its node, else 'gloo'.

    NCCL moves CUDA tensors without a host copy but takes one GPU per process; peers sharing a
    GPU, or on the CPU, use gloo (the torch transport then stages its messages on the CPU).
    Every process computes the same answer (ranks fill nodes in order, as torchrun does).
    """
    gpus = visible_gpus() if gpus is None else gpus
    wanted = cfg.cohort.devices
    size = len(cfg.peers)
    devices = [
        slot_device(r % local_world, gpus, wanted[r] if wanted else None) for r in range(size)
    ]
    if any(d.type != "cuda" for d in devices):
        return "gloo"
    for node in range(0, size, local_world):
        on_node = [d.index for d in devices[node : node + local_world]]
        if len(set(on_node)) != len(on_node):
            return "gloo"
    return "nccl"


def make_current(device: torch.device) -> torch.device:
    """Make `device` this process's current CUDA device (when it is one); returns it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
