"""This process as one peer of a cohort started by torchrun (or any launcher that sets RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT): the checks every peer process makes together, the
process group, the bus, then the trainer."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dml_cluster.bus import Bus
from dml_cluster.checkpoint.standing import examine, finished_line, read_summary
from dml_cluster.config import Config
from dml_cluster.control import Control, Topic, TorchControl
from dml_cluster.data.prepare import prepare_data
from dml_cluster.determinism import set_determinism
from dml_cluster.devices import (
    cohort_device_type,
    hosted_devices,
    make_current,
    process_group_backend,
)
from dml_cluster.errors import ConfigError, DataError, PeerError, first_line
from dml_cluster.launch.identity import agree_on_nonce, run_id
from dml_cluster.launch.reporting import let_the_cause_exit_first, reported_once, together
from dml_cluster.launch.topology import Topology, check_world, make_groups
from dml_cluster.launch.transports import make_bus
from dml_cluster.metrics import metrics_observers
from dml_cluster.metrics.loggers import check_loggers
from dml_cluster.precision import check_precision
from dml_cluster.preemption import CohortStop, stop_margin
from dml_cluster.replicas import Replicas
from dml_cluster.run_lock import claim_run_folder
from dml_cluster.trainer import CohortTrainer, Placement


def _check_same_config(cfg: Config, control: Control) -> None:
    """Every peer must run the same config: its hash (what decides the numbers) and the bus
    settings every process must share (the zmq handshake checks the hash too; torch has none).
    """
    mine = f"hash {cfg.hash()}, transport {cfg.bus.transport}, window {cfg.bus.window}"
    topology = Topology.of(cfg)
    for other, theirs in enumerate(control.all_gather_bytes(Topic.CONFIG, 0, mine.encode())):
        if theirs != mine.encode():
            peer = topology.peer_of(other)
            raise ConfigError(
                f"peer {peer} ({control.names[other]}, rank {other}) runs a different config "
                f"({theirs.decode(errors='replace')}; mine: {mine}): every peer must be given "
                "the same config"
            )


def _check_layout(cfg: Config, world: int) -> None:
    """One process per peer (K x D for data-parallel peers), on a transport that crosses
    processes."""
    if cfg.bus.transport == "local":
        raise ConfigError(
            "config error: bus.transport: 'local' keeps every peer in one process; "
            "choose zmq or torch to run one peer per process"
        )
    check_world(Topology.of(cfg), world)
    if cfg.cohort.replicas > 1 and cfg.cohort.sync_batchnorm and cohort_device_type(cfg) != "cuda":
        raise ConfigError(
            "config error: cohort.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only, and "
            "this cohort runs on the CPU: leave it false (BatchNorm per replica)"
        )


@contextlib.contextmanager
def _claim_together(cfg: Config, rank: int, control: Control) -> Iterator[None]:
    """Each peer process claims its share of the run folder (run_lock.py); when any was
    refused (another run holds the folder, it is not writable) every process exits before
    any of them writes a file."""
    topology = Topology.of(cfg)
    peer = topology.peer_of(rank)
    # a data-parallel peer's files are its replica 0's: the others lock nothing
    hosted = {peer: cfg.peers[peer].name} if topology.replica_of(rank) == 0 else {}
    with contextlib.ExitStack() as held:
        claim = claim_run_folder(cfg.run.dir, hosted)
        together(control, Topic.RUN_FOLDER, rank, lambda: held.enter_context(claim))
        yield


def _finished(cfg: Config, rank: int, control: Control) -> bool:
    """Whether the run is complete in every process (the reporting one says so in one line):
    then there is nothing to do and nothing is written. Checkpoints of another config are
    refused here, by one process, before anything is built or written."""
    standing = together(control, Topic.STANDING, rank, lambda: examine(cfg, cfg.run.dir))
    peer = Topology.of(cfg).peer_of(rank)  # a data-parallel peer's replicas read its files
    line = finished_line(cfg, standing, [cfg.peers[peer].name], reporter=rank == 0)
    if not all(
        flag == [1] for flag in control.all_gather_ints(Topic.STANDING, 1, [int(bool(line))])
    ):
        return False
    if rank == 0:
        print(line, flush=True)
    return True


def run_peer(cfg: Config) -> dict[str, Any]:
    """This process is one peer of a cohort started by torchrun (or a compatible launcher)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with reported_once():
        _check_layout(cfg, world)
        check_precision(cfg, cohort_device_type(cfg))
        check_loggers(cfg)
    set_determinism(cfg)
    topology = Topology.of(cfg)
    peer, replica = topology.peer_of(rank), topology.replica_of(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = make_current(hosted_devices(cfg, (peer,), local_rank)[peer])
    backend = process_group_backend(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    # NCCL moves CUDA tensors GPU to GPU; over gloo the torch transport stages on the CPU
    bus_device = device if backend == "nccl" else torch.device("cpu")
    # a lost peer under NCCL: the collective fails as an error the exchange catches (its own
    # wait is bounded by bus.timeout_s), not a watchdog abort; the group's timeout covers the
    # longest legitimate wait (start-up, compile, evaluation, checkpoint)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.bus.startup_timeout_s))
    except (RuntimeError, ValueError, dist.DistError) as err:
        raise PeerError(f"cannot join the cohort's process group: {first_line(err)}") from None
    bus: Bus | None = None
    control: Control | None = None
    try:
        names = [p.name for p in cfg.peers]
        processes = [topology.process_name(names, r) for r in range(world)]
        control = TorchControl(processes, cfg.bus.startup_timeout_s)
        _check_same_config(cfg, control)
        wire_id = run_id(cfg, agree_on_nonce(control))
        with _claim_together(cfg, rank, control):
            if _finished(cfg, rank, control):
                return read_summary(cfg.run.dir) or {}
            with reported_once():  # bad data: before anything is written to the run folder
                data = prepare_data(cfg)
            groups = make_groups(topology, device.type)  # D > 1: the (peer, replica) mesh
            with contextlib.ExitStack() as watching:  # a port in use: one line, no files
                observers = together(
                    control, Topic.METRICS, rank,
                    lambda: watching.enter_context(
                        metrics_observers(cfg, (peer,), run_id(cfg).hex(), local_rank, replica)
                    ),
                )  # fmt: skip
                bus = make_bus(
                    cfg, peer, topology.peers, wire_id, bus_device, replica, groups.exchange
                )
                replicas = Replicas(
                    replica, topology.replicas, groups.replica, cfg.cohort.sync_batchnorm,
                    cfg.cohort.shard == "fsdp", groups.replica_mesh,
                )  # fmt: skip
                placement = Placement((peer,), device, reporter=rank == 0, replicas=replicas)
                stop = CohortStop(cfg, _store(), f"dml-stop/{wire_id.hex()}", stop_margin(cfg))
                # the models are built before anything is written: a bad one is one line, once
                trainer = together(
                    control, Topic.BUILD, rank,
                    lambda: CohortTrainer(cfg, bus, placement, (), control, stop, data),
                )  # fmt: skip
                trainer.observe(observers)
                with reported_once(DataError):  # a bad image: every peer reads it, one says so
                    return trainer.run()
    except PeerError:
        let_the_cause_exit_first()
        raise
    finally:
        if bus is not None:
            bus.close()
        if control is not None:
            control.close()
        _leave_group()


def _store() -> dist.Store:
    """The rendezvous store of the default process group (shared by the cohort's processes)."""
    return dist.distributed_c10d._get_default_store()


def _leave_group() -> None:
    # a dead peer can make teardown fail; there is nothing left to save then
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
