"""Two gloo processes clip the gradients of a model FSDP2 shards over both of them, with a plain
module beside it (as a method's extra modules are), through `clip_gradients`; process 0 writes
how far they and the norm are from the same model's clipped unsharded (JSON to argv[1]).

    python -m tests.sharded_clip OUT.json
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

MAX_NORM = 0.05


def _clipped(model: nn.Module, extra: nn.Module, x: torch.Tensor) -> tuple[float, list]:
    from dml_cluster.optimizer import clip_gradients

    extra(model(x)).pow(2).mean().backward()
    params = [*model.parameters(), *extra.parameters()]
    norm = clip_gradients(torch.optim.SGD(params, lr=0.1), MAX_NORM)
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in params]
    return float(norm), grads


def _replica(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from dml_cluster.sharding import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    extra = nn.Linear(4, 4)
    reference, reference_extra = copy.deepcopy(model), copy.deepcopy(extra)
    x = torch.randn(6, 8)  # the same batch on both: the averaged gradient is each one's own
    shard_model(model, init_device_mesh("cpu", (2,), mesh_dim_names=("replica",)))
    norm, grads = _clipped(model, extra, x)
    reference_norm, reference_grads = _clipped(reference, reference_extra, x)
    if rank == 0:
        diffs = [float((a - b).abs().max()) for a, b in zip(grads, reference_grads, strict=True)]
        clipped = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        sharded = hasattr(next(model.parameters()), "placements")  # a DTensor
        result = {"norm": norm, "reference_norm": reference_norm, "max_grad_diff": max(diffs),
                  "clipped_norm": clipped, "sharded": sharded}  # fmt: skip
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_replica, (port, sys.argv[1]), nprocs=2, start_method="fork")


if __name__ == "__main__":
    main()
