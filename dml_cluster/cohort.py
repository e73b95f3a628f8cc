"""The peers of a cohort: each a model with its own optimizer and LR schedule.

A peer's initial weights depend only on (seed, peer index), never on which process builds it,
so the one-process engine and the multi-process trainer start from the same cohort.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dml_cluster.config import Config, OptimConfig, PeerConfig, ScheduleConfig
from dml_cluster.models import build_model


@dataclass
class Peer:
    index: int
    name: str
    config: PeerConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def set_determinism(cfg: Config) -> None:
    """Seed every RNG and, if asked, make torch's kernels deterministic."""
    torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(
    params: list[nn.Parameter], cfg: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """An LR schedule stepped once per epoch."""
    schedules = {
        "constant": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_epochs, cfg.gamma),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs),
    }
    return schedules[cfg.name]()


def build_peer(
    cfg: Config,
    index: int,
    input_shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
) -> Peer:
    """Build peer `index` of the cohort, seeded by (run.seed, index)."""
    peer_cfg = cfg.peers[index]
    torch.manual_seed(cfg.run.seed * 1009 + index)
    model = build_model(peer_cfg.model, input_shape, num_classes, **peer_cfg.args).to(device)
    optimizer = build_optimizer(list(model.parameters()), cfg.optim, peer_cfg.lr or cfg.optim.lr)
    scheduler = build_scheduler(optimizer, cfg.optim.schedule, cfg.train.epochs)
    return Peer(index, peer_cfg.name or str(index), peer_cfg, model, optimizer, scheduler)


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
