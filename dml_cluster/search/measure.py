"""What a candidate costs: latency (median of timed forward passes at a set batch on the device
it trains on, warm-up excluded), FLOPs (torch's FlopCounterMode, one sample) and parameters."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Cost:
    latency_ms: float
    mflops: float
    params: int


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs of one sample's forward pass in eval mode (a multiply-add counts 2)."""
    x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def time_forward(
    model: nn.Module, input_shape: tuple[int, int, int], batch: int, repeats: int, warmup: int
) -> float:
    """Median milliseconds of `repeats` forward passes of a `batch` (after `warmup` untimed)."""
    device = next(model.parameters()).device
    x = torch.randn(batch, *input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(
    model: nn.Module, input_shape: tuple[int, int, int], batch: int, repeats: int, warmup: int
) -> Cost:
    """Latency, FLOPs and parameters of `model` (put in eval mode; its device is used)."""
    model.eval()
    return Cost(
        latency_ms=time_forward(model, input_shape, batch, repeats, warmup),
        mflops=count_flops(model, input_shape) / 1e6,
        params=sum(p.numel() for p in model.parameters()),
    )
