"""Pieces shared by the model families: weight init and option checks."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dml_cluster.errors import ConfigError


def init_weights(model: nn.Module) -> None:
    """Standard, seed-deterministic init.

    Convs: Kaiming-normal (fan_out, ReLU), bias 0. BatchNorm: weight 1, bias 0.
    Linear layers keep PyTorch's default init (also deterministic under torch.manual_seed).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def positive_int(model: str, option: str, value: Any) -> int:
    """`value` as an int >= 1, else ConfigError naming the model and option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model '{model}': {option} must be a positive int, got {value!r}")
    return value


def positive_float(model: str, option: str, value: Any) -> float:
    """`value` as a float > 0, else ConfigError naming the model and option."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"model '{model}': {option} must be a positive number, got {value!r}")
    return float(value)


class GlobalAvgPool(nn.Module):
    """Global average pooling to [B, C, 1, 1]: the mean over the spatial dims.

    The same numbers as nn.AdaptiveAvgPool2d(1), whose CUDA backward has no deterministic
    kernel (it raises under torch.use_deterministic_algorithms); a mean's backward is a plain
    broadcast, deterministic on every device.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=True)
