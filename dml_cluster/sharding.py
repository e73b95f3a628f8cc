"""A data-parallel peer sharded over its replicas (`cohort.shard: fsdp`, torch's FSDP2
`fully_shard`), and its whole state gathered from the shards.

Each replica keeps 1/D of every parameter along dim 0 (and the optimizer keeps the state of that
share only); a forward all-gathers a unit's parameters just before it runs and frees them after,
and the backward reduce-scatters the gradients, averaged over the replicas as DDP averages them.
The units are the model's direct children that hold parameters (a ModuleList's or ModuleDict's
members in its place: a transformer's blocks; and the units inside a child that holds a weight
tied to one outside it, as GPT-2's token embedding is to its output layer), then the root: what
is left, embeddings and tied weights included (fully_shard keeps a tied weight in one group; a
tied output layer may read an embedding's weight outside the embedding's forward).

Checkpoints keep the format they have under DDP: the peer's whole state with the plain model's
names, gathered tensor by tensor (`whole`: a collective every replica calls; only the writer
keeps the gathered tensors, on the CPU), so a peer's memory holds at most one whole tensor at a
time beyond its shards. On resume every replica reads the whole state and keeps its own share
of it (`model_shards`, `optimizer_shards`: no communication), so a resume is bitwise.

This module knows torch's sharding and nothing of peers, processes or files.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor


def unshardable(model: nn.Module) -> str | None:
    """Why `fully_shard` cannot shard `model`'s parameters (it splits each along dim 0 and
    keeps it as one flat contiguous buffer), or None."""
    for name, param in model.named_parameters():
        if param.dim() == 0:
            return f"parameter {name!r} is a scalar (fully_shard splits every parameter on dim 0)"
        if not param.is_contiguous():
            return f"parameter {name!r} is not contiguous in memory (fully_shard needs it so)"
    return None


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """Every parameter's names in `model` (a tied one, GPT-2's token embedding and output
    layer, has several), by the parameter's identity."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return owners


def _units(module: nn.Module, prefix: str, owners: dict[int, list[str]]) -> list[nn.Module]:
    """The units that `shard_model` shards on their own under `module` (named `prefix`): its
    direct children that hold parameters, except that a container without a forward of its own
    (`ModuleList`, `ModuleDict`: fully_shard refuses them) is replaced by its units, and so is
    a child holding a parameter tied to one outside it (fully_shard needs tied parameters in
    one group): what cannot be split further is left to the root's group. So is an embedding:
    a tied output layer may read its weight outside its forward (`F.linear(x, embed.weight)`,
    the built-in GPT's), where a unit's weight is already resharded."""
    units = []
    for name, child in module.named_children():
        if next(child.parameters(), None) is None or isinstance(child, nn.Embedding):
            continue
        inside = f"{prefix}{name}."
        container = type(child).forward is nn.Module.forward
        tied_out = any(
            not other.startswith(inside)
            for param in child.parameters()
            for other in owners[id(param)]
        )
        if container or tied_out:  # its members run, or share a weight with the outside
            units.extend(_units(child, inside, owners))
        else:
            units.append(child)
    return units


def units(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that `shard_model` shards on their own, before the root: its
    children that hold parameters, the members of a ModuleList and of a child with a tied
    weight in their place, embeddings left out (`_units`)."""
    return _units(model, "", _owners(model))


def shard_model(model: nn.Module, mesh: Any) -> None:
    """`fully_shard` each unit of `model` (`units`), then `model` itself (what is left:
    embeddings and tied weights), over the 1-D device mesh `mesh` (a peer's replicas); in
    place."""
    from torch.distributed.fsdp import fully_shard

    for unit in units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def whole(tree: Any, keep: bool) -> Any:
    """`tree` (a state dict, nested dicts and lists) with every sharded tensor gathered whole
    (a collective over its mesh: every replica calls it, in the same order). `keep`: whether
    this process keeps what it gathered (as CPU tensors); the others get None in its place."""
    if isinstance(tree, DTensor):
        full = tree.full_tensor()
        return full.cpu() if keep else None
    if isinstance(tree, dict):
        return {k: whole(v, keep) for k, v in tree.items()}
    if isinstance(tree, list):
        return [whole(v, keep) for v in tree]
    return tree


def _share(full: Tensor, like: DTensor) -> DTensor:
    """This replica's share of `full`, sharded as `like` is (no communication)."""
    return distribute_tensor(
        full.to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )


def model_shards(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A whole model state dict as `model` (sharded) loads it: its shares of the sharded
    parameters, the rest as it is."""
    live = model.state_dict()
    return {
        k: _share(v, live[k]) if isinstance(live.get(k), DTensor) else v for k, v in state.items()
    }


def optimizer_shards(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A whole optimizer state dict as `optimizer` (over sharded parameters) loads it: each
    sharded parameter's per-parameter tensors (momentum, moments) cut to its share."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for index, entry in state["state"].items():
        param = params[index] if 0 <= index < len(params) else None
        if isinstance(param, DTensor):
            entry = {
                k: _share(v, param) if isinstance(v, Tensor) and v.shape == param.shape else v
                for k, v in entry.items()
            }
        out[index] = entry
    return {**state, "state": out}
