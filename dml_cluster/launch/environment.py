"""What started this process: a launcher that made it one peer (RANK / WORLD_SIZE set), or a
container given torchrun's PET_* variables without torchrun (Kubeflow Trainer v2)."""

from __future__ import annotations

import os

from dml_cluster.errors import ConfigError


def under_launcher() -> bool:
    """Did a launcher start this process as one peer (RANK and WORLD_SIZE set)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# torchrun's flags as the Kubeflow Trainer v2 torch runtime gives them to a node's container
PET_VARIABLES = ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def adopt_torch_runtime_env(environ: dict[str, str] | None = None) -> bool:
    """A container started with torchrun's PET_* variables and one process per node (a Kubeflow
    Trainer v2 TrainJob, or its JobSet, running `dml-cluster train` without torchrun) is peer
    PET_NODE_RANK of PET_NNODES: set the variables torch's env:// reads (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK). Nothing changes under a launcher that set RANK
    (torchrun itself) or without the PET_* variables. Returns whether it adopted them."""
    env = os.environ if environ is None else environ
    if "RANK" in env or not all(env.get(name) for name in PET_VARIABLES):
        return False
    nproc = env.get("PET_NPROC_PER_NODE", "1")
    if nproc != "1":
        raise ConfigError(
            f"PET_NPROC_PER_NODE={nproc}: a node of more than one process needs torchrun "
            "(`torchrun -m dml_cluster train ...`); a TrainJob of this project sets "
            "numProcPerNode: 1"
        )
    env.update(
        RANK=env["PET_NODE_RANK"],
        WORLD_SIZE=env["PET_NNODES"],
        MASTER_ADDR=env["PET_MASTER_ADDR"],
        MASTER_PORT=env["PET_MASTER_PORT"],
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )
    return True
