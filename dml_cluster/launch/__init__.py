"""Where a cohort runs: all peers in this process, or this process as one peer under torchrun.

The CLI picks by the environment: torchrun (or any launcher that sets RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT, `under_launcher`) makes this process peer RANK (`peer.run_peer`);
otherwise every peer runs here on a `LocalBus` (`local.run_local`). A Kubeflow Trainer v2 node
started without torchrun becomes one peer from its PET_* variables (`environment`).
`elastic.launch_elastic` starts torch's own elastic launcher for `--nproc K`. The other
modules: `identity` (the run id and the launch's nonce), `transports` (the bus a peer process
talks on), `reporting` (which process of the cohort reports an error every process met),
`topology` (which peer and replica a rank is: K peers x D data-parallel replicas).
"""

from __future__ import annotations

from dml_cluster.launch.elastic import launch_elastic
from dml_cluster.launch.environment import PET_VARIABLES, adopt_torch_runtime_env, under_launcher
from dml_cluster.launch.identity import run_id
from dml_cluster.launch.local import run_local
from dml_cluster.launch.peer import run_peer
from dml_cluster.launch.reporting import reported_once

__all__ = [
    "PET_VARIABLES",
    "adopt_torch_runtime_env",
    "launch_elastic",
    "reported_once",
    "run_id",
    "run_local",
    "run_peer",
    "under_launcher",
]
