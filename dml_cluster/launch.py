"""Where a cohort runs: all peers in this process, or this process as one peer under torchrun.

`run_cohort` picks by the environment: torchrun (or any launcher that sets RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT) makes this process peer RANK; otherwise every peer runs here on a
`LocalBus`. `launch_elastic` starts torch's own elastic launcher for `--nproc K`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dml_cluster.bus import Bus
from dml_cluster.bus.local import LocalBus
from dml_cluster.cohort import set_determinism
from dml_cluster.config import Config
from dml_cluster.control import Control, Topic, TorchControl
from dml_cluster.devices import cohort_device_type, hosted_devices, process_group_backend
from dml_cluster.errors import ConfigError, DmlError, PeerError, ReportedElsewhere
from dml_cluster.metrics import metrics_observers
from dml_cluster.metrics.events import Observer
from dml_cluster.metrics.loggers import check_loggers
from dml_cluster.precision import check_precision
from dml_cluster.preemption import CohortStop, stop_margin
from dml_cluster.run_folder import missing_folders, remove_if_empty
from dml_cluster.run_lock import claim_run_folder
from dml_cluster.signals import LAUNCHER_ENV, local_reporter, signal_name
from dml_cluster.trainer import CohortTrainer, Placement, prepare_data


def under_launcher() -> bool:
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


NONCE_BYTES = 16


def run_id(cfg: Config, nonce: bytes = b"") -> bytes:
    """8 bytes naming this run: the config, the name and the launch, and on the wire a random
    `nonce` the cohort agreed on at start-up (`agree_on_nonce`), so that a process knowing the
    config cannot forge a message the peers would take. Without a nonce: the config's id (the
    metrics' run_id label, the same across restarts)."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return hashlib.sha256(f"{cfg.run.name}/{cfg.hash()}/{launch}".encode() + nonce).digest()[:8]


def agree_on_nonce(control: Control) -> bytes:
    """Rank 0 draws a nonce for this launch (a restarted group draws a new one) and the cohort
    takes it over the control channel."""
    mine = secrets.token_bytes(NONCE_BYTES) if control.rank == 0 else b""
    nonce = control.all_gather_bytes(Topic.RUN_NONCE, 0, mine)[0]
    if len(nonce) != NONCE_BYTES:
        raise PeerError(f"rank 0 sent a run-id nonce of {len(nonce)} bytes, not {NONCE_BYTES}")
    return nonce


def _use(device: torch.device) -> torch.device:
    """Make `device` this process's current CUDA device (when it is one)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _zmq_bus(
    cfg: Config, rank: int, world: int, device: torch.device, wire_id: bytes | None = None
) -> Bus:
    """Peer `rank`'s zmq bus; `wire_id`: the run id its messages carry (default: the config's)."""
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
        rank=rank, world=world, names=names, run_id=wire_id or run_id(cfg),
        config_hash=cfg.hash(), store=dist.distributed_c10d._get_default_store(),
        address=address, timeout_s=cfg.bus.timeout_s,
        startup_timeout_s=cfg.bus.startup_timeout_s, encoding=cfg.bus.encoding,
        ipc=cfg.bus.ipc, port=port, curve=curve, window=cfg.bus.window,
    )  # fmt: skip
    print(f"dml-cluster: {names[rank]} (rank {rank}) bus inbox {bus.endpoint}", file=sys.stderr)
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
    cfg: Config, rank: int, world: int, device: torch.device, wire_id: bytes | None = None
) -> Bus:
    from dml_cluster.bus.torch_bus import TorchBus

    names = [p.name for p in cfg.peers]
    prefix = f"dml-lost/{(wire_id or run_id(cfg)).hex()}"
    return TorchBus(
        rank=rank, world=world, names=names, device=device, encoding=cfg.bus.encoding,
        timeout_s=cfg.bus.timeout_s, store=dist.distributed_c10d._get_default_store(),
        prefix=prefix,
    )  # fmt: skip


TRANSPORTS = {"zmq": _zmq_bus, "torch": _torch_bus}


def _check_same_config(cfg: Config, control: Control) -> None:
    """Every peer must run the same config: its hash (what decides the numbers) and the bus
    settings every process must share (the zmq handshake checks the hash too; torch has none).
    """
    mine = f"hash {cfg.hash()}, transport {cfg.bus.transport}, window {cfg.bus.window}"
    for other, theirs in enumerate(control.all_gather_bytes(Topic.CONFIG, 0, mine.encode())):
        if theirs != mine.encode():
            raise ConfigError(
                f"peer {other} ({cfg.peers[other].name}, rank {other}) runs a different config "
                f"({theirs.decode(errors='replace')}; mine: {mine}): every peer must be given "
                "the same config"
            )


@contextlib.contextmanager
def reported_once() -> Iterator[None]:
    """For errors every peer process meets alike (its config, the cohort's layout): local rank 0
    reports it; the others let it exit first, then exit with the same status, quietly."""
    try:
        yield
    except DmlError as err:
        if local_reporter():
            raise
        _let_the_cause_exit_first()
        raise ReportedElsewhere(err.exit_code) from None


def _check_layout(cfg: Config, world: int) -> None:
    """One process per peer, on a transport that crosses processes."""
    size = len(cfg.peers)
    if cfg.bus.transport == "local":
        raise ConfigError(
            "config error: bus.transport: 'local' keeps every peer in one process; "
            "choose zmq or torch to run one peer per process"
        )
    if world == size:
        return
    nodes = world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if nodes > 1:
        hint = f"the nodes times torchrun's --nproc-per-node must make {size}"
    else:
        hint = f"dml-cluster train CONFIG --nproc {size}, or torchrun --nproc-per-node {size}"
    raise ConfigError(
        f"config error: the cohort has {size} peers but WORLD_SIZE is {world}: "
        f"start one process per peer ({hint})"
    )


T = TypeVar("T")


def _together(control: Control, topic: Topic, rank: int, attempt: Callable[[], T]) -> T:
    """Every process makes `attempt`, then the cohort compares notes: when any met an error a
    user can act on, the first such process reports it and every process exits with its
    status, the others quietly. Every process gets there: no one waits alone."""
    refusal: DmlError | None = None
    result: Any = None
    try:
        result = attempt()
    except DmlError as err:
        refusal = err
    note = f"{refusal.exit_code} {refusal}" if refusal is not None else ""
    notes = control.all_gather_bytes(topic, 0, note.encode())
    refused = [i for i, theirs in enumerate(notes) if theirs]
    if refusal is not None and refused[0] == rank:
        raise refusal
    if refused:
        code = notes[refused[0]].split(b" ", 1)[0]
        _let_the_cause_exit_first()
        raise ReportedElsewhere(int(code) if code.isdigit() else 1)
    return result


@contextlib.contextmanager
def _claim_together(cfg: Config, rank: int, control: Control) -> Iterator[None]:
    """Each peer process claims its share of the run folder (run_lock.py); when any was
    refused (another run holds the folder, it is not writable) every process exits before
    any of them writes a file."""
    with contextlib.ExitStack() as held:
        claim = claim_run_folder(cfg.run.dir, {rank: cfg.peers[rank].name})
        _together(control, Topic.RUN_FOLDER, rank, lambda: held.enter_context(claim))
        yield


def run_peer(cfg: Config) -> dict[str, Any]:
    """This process is one peer of a cohort started by torchrun (or a compatible launcher)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with reported_once():
        _check_layout(cfg, world)
        check_precision(cfg, cohort_device_type(cfg))
        check_loggers(cfg)
    set_determinism(cfg)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _use(hosted_devices(cfg, (rank,), local_rank)[rank])
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
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PeerError(f"cannot join the cohort's process group: {first}") from None
    bus: Bus | None = None
    control: Control | None = None
    try:
        control = TorchControl([p.name for p in cfg.peers], cfg.bus.startup_timeout_s)
        _check_same_config(cfg, control)
        wire_id = run_id(cfg, agree_on_nonce(control))
        with _claim_together(cfg, rank, control):
            with reported_once():  # bad data: before anything is written to the run folder
                data = prepare_data(cfg)
            make_bus = TRANSPORTS[cfg.bus.transport]
            bus = make_bus(cfg, rank, world, wire_id=wire_id, device=bus_device)
            placement = Placement((rank,), device, reporter=rank == 0)
            stop = CohortStop(cfg, _store(), f"dml-stop/{wire_id.hex()}", stop_margin(cfg))
            # the models are built before anything is written: a bad one is one line, once
            trainer = _together(
                control, Topic.BUILD, rank,
                lambda: CohortTrainer(cfg, bus, placement, (), control, stop, data),
            )  # fmt: skip
            with metrics_observers(cfg, (rank,), run_id(cfg).hex(), local_rank) as observers:
                trainer.observe(observers)
                return trainer.run()
    except PeerError:
        _let_the_cause_exit_first()
        raise
    finally:
        if bus is not None:
            bus.close()
        if control is not None:
            control.close()
        _leave_group()


CAUSE_GRACE_S = 3.0
"""How long a peer that lost its cohort waits before exiting, next to other local peers."""


def _let_the_cause_exit_first() -> None:
    """A lost cohort is mostly the consequence of another peer's failure. Next to other workers
    of one torchrun agent, give that peer time to exit first (interpreter shutdown with torch
    takes a second or more), so the launcher reports the cause and its exit code."""
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        time.sleep(CAUSE_GRACE_S)


def _store() -> dist.Store:
    """The rendezvous store of the default process group (shared by the cohort's processes)."""
    return dist.distributed_c10d._get_default_store()


def _leave_group() -> None:
    # a dead peer can make teardown fail; there is nothing left to save then
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def run_local(cfg: Config, observers: Sequence[Observer] = ()) -> dict[str, Any]:
    """Every peer in this process: the one-device mode, and the oracle for the others.
    `observers`: watch the run beside the run log and the metrics (benchmarks' clocks)."""
    check_precision(cfg, cohort_device_type(cfg))
    check_loggers(cfg)
    set_determinism(cfg)
    hosted = tuple(range(len(cfg.peers)))
    devices = hosted_devices(cfg, hosted)  # peer i on GPU i % n, or cohort.devices
    device = _use(devices[hosted[0]])
    with claim_run_folder(cfg.run.dir, {i: cfg.peers[i].name for i in hosted}):
        data = prepare_data(cfg)  # bad data, a bad model: before anything is written
        placement = Placement(hosted, device, reporter=True, devices=devices)
        trainer = CohortTrainer(cfg, LocalBus(), placement, data=data)
        with metrics_observers(cfg, hosted, run_id(cfg).hex()) as metrics:
            trainer.observe([*observers, *metrics])
            return trainer.run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _root_cause(err: Any) -> tuple[int, Any]:
    """The failure that explains the others: a peer that lost its cohort (200) or was stopped by
    the launcher (SIGTERM) is a consequence; the earliest other failure is the cause."""
    consequences = {PeerError.exit_code, -signal.SIGTERM, 128 + signal.SIGTERM}
    causes = {r: f for r, f in err.failures.items() if f.exitcode not in consequences}
    pool = causes or err.failures
    rank = min(pool, key=lambda r: pool[r].timestamp)
    return rank, pool[rank]


def launch_elastic(
    config: str,
    overrides: list[str],
    nproc: int,
    max_restarts: int = 0,
    wait_s: int = 30,
    run_dir: Path | None = None,
) -> int:
    """Start `nproc` peer processes with torch.distributed.run (torchrun), one node, c10d store.

    An explicit c10d endpoint (not --standalone) keeps restarts working with gloo
    (pytorch/pytorch#135712). Returns the exit code to use. `wait_s`: how long the launcher
    waits for the peers after passing a SIGTERM on (their checkpoint save) before killing them.
    `run_dir`: the run folder; when the peers made it and left it empty, it is removed.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = [
        f"--nproc-per-node={nproc}", "--nnodes=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}", f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2", "-m", "dml_cluster", "train", config,
    ]  # fmt: skip
    for item in overrides:
        argv += ["--set", item]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(wait_s))
    # a fresh worker store for every restart: keys left by the failed attempt in a shared store
    # break the restarted group's gloo set-up (pytorch/pytorch#135712, DESIGN.md section 8)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ[LAUNCHER_ENV] = "1"  # the peers stop quietly on a signal: this process says it
    made = missing_folders(run_dir) if run_dir is not None else []
    try:
        with _quiet_signal_relay():
            run(get_args_parser().parse_args(argv))
    except SignalException as err:
        # torch's agent has stopped the peers (the same signal, then SIGKILL after a timeout)
        stopped = DmlError(
            f"stopped by {signal_name(err.sigval)}; the peers were stopped too (run the same "
            "command again to resume from the last complete checkpoint)"
        )
        stopped.exit_code = 128 + err.sigval
        raise stopped from None
    except ChildFailedError as err:
        rank, failure = _root_cause(err)
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        error = PeerError(f"peer process rank {rank} failed with exit code {code}")
        sigterm = {128 + signal.SIGTERM, -signal.SIGTERM}  # a peer's own exit, or the agent's
        if code == 128 + signal.SIGTERM and {f.exitcode for f in err.failures.values()} <= sigterm:
            error = PeerError(
                f"the peers stopped on SIGTERM (exit {code}), after saving a checkpoint where the "
                "cohort stopped (checkpoint.on_signal): run the same command again to resume"
            )
        error.exit_code = code
        if code == ConfigError.exit_code:  # a permanent error: the peer has said it in one line
            raise ReportedElsewhere(code) from None
        raise error from None
    finally:
        os.environ.pop(LAUNCHER_ENV, None)
        remove_if_empty(made)
    return 0


_ELASTIC_LOGGERS = (
    "torch.distributed.elastic.agent.server.api",
    "torch.distributed.elastic.multiprocessing.api",
)


class _NoSignalRelay(logging.Filter):
    """Drops torch elastic's lines about passing a stop signal on to each peer (the launcher
    says it in one line) and about a peer that exited 2 (it said why in one line). Its lines
    about a peer that crashed or had to be killed stay."""

    RELAY = ("death signal, shutting down workers", "closing signal", "Closing process")
    REPORTED = f"failed (exitcode: {ConfigError.exit_code})"  # the peer's own line says why

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.RELAY) and self.REPORTED not in message


@contextlib.contextmanager
def _quiet_signal_relay() -> Iterator[None]:
    relay = _NoSignalRelay()
    for name in _ELASTIC_LOGGERS:
        logging.getLogger(name).addFilter(relay)
    try:
        yield
    finally:
        for name in _ELASTIC_LOGGERS:
            logging.getLogger(name).removeFilter(relay)
