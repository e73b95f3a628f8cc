"""Which peer and replica a process is, and the process groups that follow from it.

A cohort of K peers with `cohort.replicas: D` runs K x D processes. Ranks are peer-major: peer p's
replicas are ranks p*D .. p*D + D - 1 (consecutive, so torchrun places them on one node where the
node has D slots, and the gradient all-reduce stays inside it). Two kinds of groups follow, the
two dimensions of a 2-D `torch.distributed.device_mesh.DeviceMesh` of shape (K, D) named
("peer", "replica"):

- a peer's **replica group** (the mesh's "replica" dimension): its D processes, over which DDP
  averages gradients (and SyncBatchNorm shares statistics);
- replica r's **exchange group** (the "peer" dimension): replica r of every peer, the K processes
  that exchange the predictions of the r-th share of the batch. The torch transport's
  collectives run on it; the zmq bus of replica r connects only to the other peers' replica r.

With D = 1 no mesh is made: the exchange group is the default group, as it always was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dml_cluster.config import Config
from dml_cluster.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    """K peers x D replicas, ranks peer-major."""

    peers: int
    replicas: int = 1

    @classmethod
    def of(cls, cfg: Config) -> Topology:
        return cls(len(cfg.peers), cfg.cohort.replicas)

    @property
    def world(self) -> int:
        return self.peers * self.replicas

    def peer_of(self, rank: int) -> int:
        return rank // self.replicas

    def replica_of(self, rank: int) -> int:
        return rank % self.replicas

    def rank(self, peer: int, replica: int) -> int:
        return peer * self.replicas + replica

    def replica_ranks(self, peer: int) -> list[int]:
        """The ranks of peer `peer`'s replicas (its replica group)."""
        return [self.rank(peer, r) for r in range(self.replicas)]

    def exchange_ranks(self, replica: int) -> list[int]:
        """The ranks of every peer's replica `replica` (that replica index's exchange group)."""
        return [self.rank(p, replica) for p in range(self.peers)]

    def process_name(self, names: list[str], rank: int) -> str:
        """How errors name process `rank`: its peer's name, and its replica when D > 1."""
        name = names[self.peer_of(rank)]
        return f"{name} replica {self.replica_of(rank)}" if self.replicas > 1 else name


def nproc_hint(topology: Topology) -> str:
    """How to start the right number of processes on one node."""
    n = topology.world
    return f"dml-cluster train CONFIG --nproc {n}, or torchrun --nproc-per-node {n}"


def check_world(topology: Topology, world: int) -> None:
    """WORLD_SIZE must be K x D: one line naming the launch that makes it."""
    if world == topology.world:
        return
    k, d = topology.peers, topology.replicas
    nodes = world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if nodes > 1:
        hint = f"the nodes times torchrun's --nproc-per-node must make {topology.world}"
    else:
        hint = nproc_hint(topology)
    if d == 1:
        raise ConfigError(
            f"config error: the cohort has {k} peers but WORLD_SIZE is {world}: "
            f"start one process per peer ({hint})"
        )
    raise ConfigError(
        f"config error: the cohort has {k} peers x {d} replicas (cohort.replicas) but "
        f"WORLD_SIZE is {world}: start {k}x{d} = {k * d} processes ({hint})"
    )


@dataclass(frozen=True)
class ProcessGroups:
    """This process's groups: its peer's replicas, and its replica index's exchange group
    (None: the default group, D = 1)."""

    replica: dist.ProcessGroup | None
    exchange: dist.ProcessGroup | None
    replica_mesh: Any = None
    """The mesh's "replica" dimension: the 1-D mesh FSDP2 shards a peer over."""


def make_groups(topology: Topology, device_type: str) -> ProcessGroups:
    """The (peer, replica) device mesh over the joined default group (collective: every process
    calls it at the same point). D = 1: no groups, the exchange runs on the default group."""
    if topology.replicas == 1:
        return ProcessGroups(None, None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        device_type,
        (topology.peers, topology.replicas),
        mesh_dim_names=("peer", "replica"),
    )
    return ProcessGroups(mesh.get_group("replica"), mesh.get_group("peer"), mesh["replica"])
