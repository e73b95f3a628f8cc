"""The bus a peer process talks on (`bus.transport`: zmq or torch), built the one way every
caller builds it (the peer process; benchmarks/step_ratio.py)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sys

import torch
import torch.distributed as dist

from dml_cluster.bus import Bus
from dml_cluster.bus.encoding import Encoding
from dml_cluster.config import Config, peer_temperatures

TRANSPORTS = ("zmq", "torch")
"""The transports that cross processes (`make_bus`)."""


def bus_encoding(cfg: Config, replica: int = 0) -> Encoding:
    """bus.encoding with its settings, as every bus applies it (the one-process one too):
    sampled ids are drawn with run.seed at each peer's receivers' temperature; a data-parallel
    peer's replica `replica` draws its share's rows as they are numbered in the whole batch (a
    language model's rows are its windows' positions: block_size rows per window)."""
    bus = cfg.bus
    first_row = replica * (cfg.data.batch_size // cfg.cohort.replicas) * cfg.data.rows_per_sample
    return Encoding(
        bus.encoding, bus.k, bus.sparse_dtype, bus.samples, cfg.run.seed, peer_temperatures(cfg),
        first_row,
    )  # fmt: skip


def make_bus(
    cfg: Config, rank: int, world: int, wire_id: bytes, device: torch.device,
    replica: int = 0, group: dist.ProcessGroup | None = None,
) -> Bus:  # fmt: skip
    """Peer `rank`'s bus of `cfg.bus.transport` (of `world` peers), in a process group already
    joined. `wire_id`: the run id its messages carry (`identity.run_id`); `device`: where the
    torch transport's collectives run (zmq stages on the host whatever the device); `replica`
    and `group`: a data-parallel cohort's replica index, whose bus joins every peer's replica of
    that index (`group`: their processes, for the torch transport; launch/topology.py)."""
    if cfg.bus.transport == "zmq":
        return _zmq_bus(cfg, rank, world, wire_id, replica)
    if cfg.bus.transport == "torch":
        return _torch_bus(cfg, rank, world, wire_id, device, replica, group)
    raise ValueError(f"bus.transport {cfg.bus.transport!r} does not cross processes")


def _zmq_bus(cfg: Config, rank: int, world: int, wire_id: bytes, replica: int) -> Bus:
    from dml_cluster.bus.zmq_bus import ZmqBus, bind_address

    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    address = cfg.bus.address or bind_address(master, int(os.environ.get("MASTER_PORT", "29500")))
    if not cfg.bus.address and not cfg.bus.ipc:
        _warn_if_unreachable(master, address, world)
    names = [p.name for p in cfg.peers]
    curve = None
    if cfg.bus.curve_keys:
        from dml_cluster.bus.curve import load_curve_keys

        curve = load_curve_keys(cfg.bus.curve_keys, names[rank], names)
    port = cfg.bus.port + int(os.environ.get("LOCAL_RANK", "0")) if cfg.bus.port else None
    bus = ZmqBus(
        rank=rank, world=world, names=names, run_id=wire_id,
        config_hash=cfg.hash(), store=dist.distributed_c10d._get_default_store(),
        address=address, timeout_s=cfg.bus.timeout_s,
        startup_timeout_s=cfg.bus.startup_timeout_s, encoding=bus_encoding(cfg, replica),
        ipc=cfg.bus.ipc, port=port, curve=curve, window=cfg.bus.window,
        scope=f"replica-{replica}" if cfg.cohort.replicas > 1 else "",
    )  # fmt: skip
    who = (
        f"{names[rank]} replica {replica}"
        if cfg.cohort.replicas > 1
        else f"{names[rank]} (rank {rank})"
    )
    print(f"dml-cluster: {who} bus inbox {bus.endpoint}", file=sys.stderr)
    return bus


def _warn_if_unreachable(master: str, address: str, world: int) -> None:
    """A host name that resolves to loopback here (Debian's `127.0.1.1 host` line) in a cohort
    spanning nodes: the other nodes cannot reach this peer's inbox, so say why before they time
    out. A loopback MASTER_ADDR given as such (localhost, 127.x) means one host on purpose."""
    nodes = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if nodes < 2 or master == "localhost" or not ipaddress.ip_address(address).is_loopback:
        return
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(master).is_loopback:
            return
    print(
        f"dml-cluster: warning: MASTER_ADDR {master} resolves to a loopback address on this "
        f"node, but the cohort spans {nodes} nodes, which cannot reach this peer there: make "
        "this host's name resolve to its network address, or give torchrun --local-addr ADDR "
        "(launch/multinode.sh: LOCAL_ADDR=ADDR)",
        file=sys.stderr,
    )


def _torch_bus(
    cfg: Config, rank: int, world: int, wire_id: bytes, device: torch.device, replica: int,
    group: dist.ProcessGroup | None,
) -> Bus:  # fmt: skip
    from dml_cluster.bus.torch_bus import TorchBus

    names = [p.name for p in cfg.peers]
    scope = f"/replica-{replica}" if cfg.cohort.replicas > 1 else ""
    return TorchBus(
        rank=rank, world=world, names=names, device=device, encoding=bus_encoding(cfg, replica),
        timeout_s=cfg.bus.timeout_s, store=dist.distributed_c10d._get_default_store(),
        prefix=f"dml-lost/{wire_id.hex()}{scope}", group=group,
    )  # fmt: skip
