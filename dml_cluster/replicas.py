"""A data-parallel peer: D processes (replicas) that train one peer together, with torch's own
engine.

Replica r reads the r-th of D equal shares of each step's batch (dml_cluster.data.loader), and
its training forward goes through `DistributedDataParallel` over the peer's replica group, so the
backward averages the gradients over the replicas: the mean of D share means is the mean over the
whole batch, and every replica steps to the same weights. The modules a method trains next to the
student (FitNets' regressor) are not in DDP's forward; their gradients are averaged by a hook on
each of their parameters, in backward order, on the same group. BatchNorm keeps statistics per
replica (DDP broadcasts replica 0's buffers at each forward) unless `cohort.sync_batchnorm`, which
converts it to `SyncBatchNorm` over the replica group (CUDA only: torch's kernel).

`cohort.shard: fsdp` shards the student over the replicas instead (dml_cluster.sharding: FSDP2
`fully_shard` over the "replica" dimension of the device mesh, before its optimizer is built):
no DDP wrapper, the sharded model's own forward and backward gather parameters and average
gradients. Every replica then takes part in what runs the model (evaluation, the final weights,
each checkpoint's gathering of the whole state), and BatchNorm's running statistics stay each
replica's own (FSDP2 does not broadcast buffers): replica 0's are the ones evaluated and saved.

Each replica draws dropout masks from a stream of its own (dml_cluster.streams: seeded by
(seed, peer, replica)). A checkpoint is written by replica 0 and holds every replica's stream
(`gather_streams`, over the control channel), so each replica resumes its own.

This module knows the replicas of one peer, nothing of the exchange between peers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dml_cluster.cohort import Peer
from dml_cluster.control import Control, Topic
from dml_cluster.errors import ConfigError, PeerError
from dml_cluster.sharding import shard_model, unshardable
from dml_cluster.streams import PeerStream


@dataclass(frozen=True)
class Replicas:
    """This process's place among its peer's replicas: replica `index` of `count`, and the
    group of the peer's replicas (None with one replica)."""

    index: int = 0
    count: int = 1
    group: Any = None  # a torch.distributed ProcessGroup
    sync_batchnorm: bool = False
    sharded: bool = False
    """cohort.shard: fsdp (the peer's parameters sharded over `mesh`, its replicas)."""
    mesh: Any = None  # the 1-D DeviceMesh of the peer's replicas (sharded only)

    @property
    def shard(self) -> tuple[int, int]:
        """(r, D): which share of each step's batch this replica reads."""
        return self.index, self.count

    @property
    def first(self) -> bool:
        """Replica 0: the one that writes the peer's files, evaluates and reports it."""
        return self.index == 0

    @property
    def active(self) -> bool:
        return self.count > 1

    def whole_batch_share(self, marked: Tensor) -> Tensor:
        """The count of marked rows (a bool [B] of this replica's share) over the peer's whole
        batch, divided by the replicas: what a replica's masked mean divides by, so that DDP's
        average of the replicas' gradients is the gradient of the whole batch's masked mean.
        An all-reduce over the replica group, on the device (no host read)."""
        count = marked.sum().to(torch.float32)
        dist.all_reduce(count, group=self.group)
        return count / self.count


def sharding(replicas: Replicas) -> Callable[[nn.Module, str], nn.Module] | None:
    """What `build_peer` applies to a student's model before building its optimizer: under
    cohort.shard: fsdp, shard it over the replicas (SyncBatchNorm first where asked); None
    otherwise. A model FSDP2 cannot shard is a one-line ConfigError."""
    if not (replicas.active and replicas.sharded):
        return None

    def shard(model: nn.Module, model_name: str) -> nn.Module:
        reason = unshardable(model)
        if reason is not None:
            raise ConfigError(
                f"config error: cohort.shard: fsdp cannot shard model {model_name!r}: {reason}; "
                "use cohort.shard: ddp"
            )
        if replicas.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model, replicas.group)
        shard_model(model, replicas.mesh)
        return model

    return shard


def replicate(peer: Peer, replicas: Replicas) -> None:
    """Make a student's training data-parallel over its replicas (nothing for one replica or a
    teacher, which only predicts): DDP, or (sharded) only its extra modules' gradient average,
    the model being sharded already (`sharding`)."""
    if not replicas.active or peer.is_teacher:
        return
    for param in peer.extras.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_averaging(replicas))
    if replicas.sharded:
        return
    device = next(peer.model.parameters()).device
    if replicas.sync_batchnorm:
        peer.model = nn.SyncBatchNorm.convert_sync_batchnorm(peer.model, replicas.group)
    ids = [device.index] if device.type == "cuda" else None
    # DDP's default: replica 0's buffers (BatchNorm's running statistics) reach every replica
    # at each forward
    peer.replicated = DistributedDataParallel(
        peer.model, device_ids=ids, process_group=replicas.group
    )


def _averaging(replicas: Replicas):  # noqa: ANN202 - a hook
    def average(param: Tensor) -> None:
        assert param.grad is not None
        param.grad.div_(replicas.count)
        dist.all_reduce(param.grad, group=replicas.group)

    return average


# -- the replicas' random streams in the peer's checkpoint ------------------------------------


def _stream_bytes(stream: PeerStream) -> bytes:
    state = stream.state_dict()
    return b"".join(state[k].numpy().tobytes() for k in ("cpu", "cuda") if k in state)


def _stream_state(data: bytes, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """A stream state from its bytes, laid out like this process's own (`like`)."""
    out, at = {}, 0
    for key in ("cpu", "cuda"):
        if key in like:
            n = like[key].numel()
            out[key] = torch.frombuffer(bytearray(data[at : at + n]), dtype=torch.uint8)
            at += n
    if at != len(data):
        raise PeerError(f"a replica's random stream is {len(data)} bytes, expected {at}")
    return out


def gather_streams(
    control: Control, step: int, stream: PeerStream, peer: int, replicas: Replicas
) -> list[dict[str, Tensor]]:
    """Every replica's stream of this process's peer, in replica order (collective: every
    process of the cohort calls it at the same step; ranks are peer-major)."""
    everyone = control.all_gather_bytes(Topic.REPLICA_STREAMS, step, _stream_bytes(stream))
    mine = everyone[peer * replicas.count : (peer + 1) * replicas.count]
    like = stream.state_dict()
    return [_stream_state(data, like) for data in mine]
