"""The peers of a cohort: each a model (plus the modules its method trains next to it) with its
own optimizer and LR schedule.

A peer's initial weights depend only on (seed, peer index), never on which process builds it,
so the one-process engine and the multi-process trainer start from the same cohort. A teacher
(role: teacher) is loaded from its checkpoint, frozen and kept in eval mode; it still gets an
optimizer and a schedule (over frozen parameters, so stepping them changes nothing) so that every
peer can be handled alike by the loop and by checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dml_cluster.config import Config, PeerConfig
from dml_cluster.errors import ConfigError, first_line
from dml_cluster.init_from import KEY as INIT_FROM
from dml_cluster.init_from import initial_weights
from dml_cluster.models import build_model
from dml_cluster.optimizer import build_optimizer, build_scheduler
from dml_cluster.precision import make_scaler, prepare_model
from dml_cluster.streams import PeerStream

if TYPE_CHECKING:
    from dml_cluster.method_inputs import MethodInputs


@dataclass
class Peer:
    """One peer: `extras` are the modules its method trains next to the model (FitNets'
    regressor); the optimizer covers both, and checkpoints save both. `stream`: its own random
    stream (dml_cluster.streams), entered for every draw made on its behalf."""

    index: int
    name: str
    config: PeerConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: PeerStream
    extras: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    scaler: torch.amp.GradScaler | None = None
    """fp16's loss scaler (run.precision: fp16; checkpointed with the peer)."""
    replicated: nn.Module | None = None
    """A data-parallel student's DDP wrapper (dml_cluster.replicas), which its training forward
    goes through so that backward averages the gradients over its replicas; `model` stays the
    plain module (evaluation, checkpoints: the plain parameter names). None for a sharded
    student (cohort.shard: fsdp), whose `model` is itself the sharded module."""

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward: through the DDP wrapper where there is one."""
        return (self.replicated or self.model)(x)

    @property
    def is_teacher(self) -> bool:
        return self.config.role == "teacher"


def build_peer(
    cfg: Config,
    index: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    method: MethodInputs | None = None,
    replica: int = 0,
    shard: Callable[[nn.Module, str], nn.Module] | None = None,
) -> Peer:
    """Build peer `index` of the cohort, seeded by (run.seed, index); its random stream too
    (by (run.seed, index, replica) for a data-parallel peer's replica `replica` > 0). `shard`:
    what shards a student's model over its replicas (cohort.shard: fsdp; replicas.sharding),
    applied to the whole model before its optimizer is built.

    A student is attached to its method's inputs (`method`: its declared features hooked, its
    teacher on `device`) and gets the extra modules the method trains next to its model (seeded
    by the same pair); its optimizer and schedule cover the model's parameters and theirs.
    """
    peer_cfg = cfg.peers[index]
    torch.manual_seed(cfg.run.seed * 1009 + index)
    try:
        model = build_model(peer_cfg.model, input_shape, num_classes, **peer_cfg.args)
    except ConfigError as err:
        key = f"cohort.peers.{index}.model" if cfg.cohort.peers else "cohort.model"
        raise ConfigError(f"config error: {key}: {err}") from None
    model = model.to(device)
    extras = nn.ModuleDict()
    if peer_cfg.role == "teacher":
        load_teacher(model, peer_cfg)
    elif peer_cfg.weights:
        load_weights(model, peer_cfg, "weights")
    elif (start := initial_weights(cfg, peer_cfg.name)) is not None:
        load_weights(model, peer_cfg, INIT_FROM, start)  # another run's final weights
    if peer_cfg.role == "student" and method is not None:
        torch.manual_seed(cfg.run.seed * 1009 + index + 7919)
        extras.update(method.attach(index, model, device))
    if shard is not None and peer_cfg.role == "student":
        model = shard(model, peer_cfg.model)
    params = [*model.parameters(), *extras.parameters()]
    optimizer = build_optimizer(params, cfg.optim, peer_cfg.lr or cfg.optim.lr)
    scheduler = build_scheduler(optimizer, cfg.optim.schedule, cfg.train.epochs)
    if peer_cfg.role == "teacher":
        optimizer.step()  # no parameter has a gradient: changes nothing, marks the optimizer used
    prepare_model(model, cfg.run, device)  # layout, autocast, compile: after weights and probes
    scaler = make_scaler(cfg.run.precision, device) if peer_cfg.role == "student" else None
    stream = PeerStream(cfg.run.seed, index, device, replica)
    return Peer(index, peer_cfg.name, peer_cfg, model, optimizer, scheduler, stream, extras, scaler)


def refresh_predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward in training mode without a graph and without touching BN running statistics.

    Used by the sequential update: a peer that has just stepped re-publishes its predictions on
    the same batch; its running statistics must count that batch once, not twice.
    """
    saved = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        logits = model(x)
    with torch.no_grad():
        for buf, old in zip(model.buffers(), saved, strict=True):
            buf.copy_(old)
    return logits


def read_weights(
    path: str | Path, peer_name: str | None = None, key: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """A model state_dict from a file: a plain state_dict (final/<peer>.pt), a {"model": ...}
    dict (a cohort checkpoint's step-N/<peer>.pt), or a checkpoint's step-N folder (the file of
    the peer called `peer_name`, or of its only peer). Loaded with weights_only=True: tensors
    and plain containers, no arbitrary objects. `key`: the config key named in errors."""
    path = Path(path)
    if path.is_dir():
        path = _peer_file(path, peer_name)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"config error: {key} {path}: no such file") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(
            f"config error: {key} {path}: not a readable torch file ({first_line(err)})"
        ) from None
    for inner in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(inner), dict):
            obj = obj[inner]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"config error: {key} {path}: no model state_dict in it")
    return obj


def _peer_file(folder: Path, peer_name: str | None) -> Path:
    """In a checkpoint's step folder: the file of `peer_name`, or of the only peer there."""
    files = sorted(folder.glob("*.pt"))
    named = [f for f in files if f.stem == peer_name]
    if named or len(files) == 1:
        return (named or files)[0]
    raise ConfigError(
        f"config error: checkpoint {folder} holds peers {[f.stem for f in files]}; "
        f"name the teacher after one of them"
    )


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the model can only predict."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_weights(
    model: nn.Module, peer_cfg: PeerConfig, key: str = "checkpoint", path: Path | None = None
) -> nn.Module:
    """Load the file of the peer's `key` (checkpoint or weights; or `path`, named `key` in
    errors) into `model`, strictly."""
    path = path if path is not None else getattr(peer_cfg, key) or ""
    state = read_weights(path, peer_cfg.name, key)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines()]
        first = lines[1] if len(lines) > 1 else lines[0]
        raise ConfigError(
            f"config error: {key} {path} does not fit model "
            f"{peer_cfg.model!r} {peer_cfg.args or ''}: {first}"
        ) from None
    return model


def load_teacher(model: nn.Module, peer_cfg: PeerConfig) -> nn.Module:
    """Load a teacher's weights into `model` (strictly; none without a checkpoint: a model that
    came with its trained weights, `config.check_names`) and freeze it."""
    if peer_cfg.checkpoint:
        load_weights(model, peer_cfg)
    return freeze(model)
