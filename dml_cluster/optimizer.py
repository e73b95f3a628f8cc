"""A peer's optimizer, its learning-rate schedule and gradient clipping (`optim` in the config).

Optimizers: SGD (momentum, Nesterov), Adam (L2 weight decay) and AdamW (decoupled weight decay,
what language models train with); `decay_1d_params: false` exempts 1-D parameters (biases, norm
scales) from weight decay, as nanoGPT and Hugging Face's Trainer do. One parameter group, or two
with the exemption, so that a config that does not ask keeps its optimizer's state as before.

Schedules count epochs (`unit: epoch`: a torch scheduler stepped at each epoch's end) or
optimizer steps (`unit: step`: a factor of the step alone, set before every update, so a run
resumed mid-epoch follows the same rates as one never stopped). The linear warm-up
(`warmup_steps`) is per step in either unit; a per-step cosine or linear decay starts after it
and spans the rest of the run's steps. `grad_clip` bounds the L2 norm of all a peer's gradients
together before each update, after backward (after DDP's or FSDP's averaging: every replica
clips the same gradient) and after fp16's unscaling.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dml_cluster.config import OptimConfig, ScheduleConfig

Optimizer = torch.optim.Optimizer
Scheduler = torch.optim.lr_scheduler.LRScheduler


def parameter_groups(params: list[nn.Parameter], cfg: OptimConfig) -> list[dict]:
    """One group of every parameter, or (decay_1d_params: false) the matrices and the 1-D
    parameters apart, the latter without weight decay."""
    if cfg.decay_1d_params:
        return [{"params": params}]
    matrices = [p for p in params if p.ndim >= 2]
    vectors = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": matrices}, {"params": vectors, "weight_decay": 0.0})
            if g["params"]]  # fmt: skip


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, lr: float) -> Optimizer:
    groups = parameter_groups(params, cfg)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def build_scheduler(optimizer: Optimizer, cfg: ScheduleConfig, epochs: int) -> Scheduler:
    """The torch scheduler stepped once per epoch (`step_schedule`); constant under unit: step,
    whose decay is `step_factor`'s."""
    if cfg.unit == "step" or cfg.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    lr = optimizer.param_groups[0]["lr"]
    schedules = {
        "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_epochs, cfg.gamma),
        "multistep": lambda: torch.optim.lr_scheduler.MultiStepLR(
            optimizer, cfg.milestones, cfg.gamma
        ),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, epochs, eta_min=lr * cfg.min_lr_ratio
        ),
        "linear": lambda: torch.optim.lr_scheduler.LinearLR(
            optimizer, 1.0, cfg.min_lr_ratio, total_iters=epochs
        ),
    }
    return schedules[cfg.name]()


def step_factor(cfg: ScheduleConfig, step: int, total: int) -> float:
    """What multiplies the schedule's learning rate at optimizer step `step` (from 0) of a run
    of `total` steps: the warm-up's (step + 1) / warmup_steps during it, times (unit: step) the
    decay's: multistep's gamma per milestone passed, or cosine's and linear's fall from 1 to
    min_lr_ratio over the steps after the warm-up."""
    warmup = cfg.warmup_steps
    factor = (step + 1) / warmup if step < warmup else 1.0
    if cfg.unit == "epoch" or cfg.name == "constant":
        return factor
    if cfg.name == "multistep":
        return factor * cfg.gamma ** bisect.bisect_right(cfg.milestones, step)
    if step < warmup:
        return factor
    done = (step - warmup) / max(total - warmup, 1)
    shape = 0.5 * (1.0 + math.cos(math.pi * done)) if cfg.name == "cosine" else 1.0 - done
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def set_learning_rate(
    optimizer: Optimizer, scheduler: Scheduler, cfg: ScheduleConfig, step: int, total: int
) -> None:
    """Before update `step`: each group's rate is the scheduler's times `step_factor`. Under
    unit: epoch after the warm-up the scheduler's own rate stands (left as it is)."""
    if cfg.unit == "epoch" and step >= cfg.warmup_steps:
        return
    factor = step_factor(cfg, step, total)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr * factor


def step_schedule(optimizer: Optimizer, scheduler: Scheduler) -> None:
    """The epoch's step of the LR schedule, from the schedule's own rate (a warm-up or a
    per-step factor scaled the optimizer's; the schedules that chain read it)."""
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    scheduler.step()


def clip_gradients(optimizer: Optimizer, max_norm: float) -> Tensor:
    """Scale the gradients of every parameter the optimizer updates so that their L2 norm
    together is at most `max_norm`; the norm before clipping. A sharded model's gradients
    (DTensors, cohort.shard: fsdp) count with their whole tensors: their norm is reduced over
    the replicas before it is combined with the plain parameters' (a method's extra modules)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    norms = []
    for part in (sharded, plain):
        if part:
            norm = torch.nn.utils.get_total_norm([p.grad for p in part])
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    for part in (sharded, plain):
        if part:
            torch.nn.utils.clip_grads_with_norm_(part, max_norm, total)
    return total
