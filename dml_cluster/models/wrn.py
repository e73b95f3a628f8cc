"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k, depth d = 6n+4, widen factor k.

Pre-activation blocks (BN -> ReLU -> conv), stage widths 16k/32k/64k on a 16-channel stem.
No dropout: the forward pass is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dml_cluster.errors import ConfigError
from dml_cluster.models._common import GlobalAvgPool, init_weights, positive_int
from dml_cluster.models.registry import InputShape, register


class WideBlock(nn.Module):
    """BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus (projected) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        # As in the reference WRN, a projection shortcut reads the pre-activated input.
        residual = x if self.shortcut is None else self.shortcut(act)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + residual


class WideResNet(nn.Module):
    """Stem conv3x3 -> 3 stages (strides 1, 2, 2) -> BN -> ReLU -> avgpool -> linear."""

    def __init__(self, in_channels: int, num_classes: int, depth: int, widen: int) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages, ch = [], widths[0]
        for out_ch, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks = [WideBlock(ch, out_ch, stride)]
            blocks += [WideBlock(out_ch, out_ch, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(ch)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.stages(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


@register("wrn")
def build_wrn(
    input_shape: InputShape, num_classes: int, *, depth: int = 16, widen: int = 2
) -> nn.Module:
    """WRN-depth-widen; depth must be 6n+4 (10, 16, 22, 28, 40, ...)."""
    depth = positive_int("wrn", "depth", depth)
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(
            f"model 'wrn': depth must be 6n+4 with n >= 1 (16, 28, 40, ...), got {depth}"
        )
    return WideResNet(input_shape[0], num_classes, depth, positive_int("wrn", "widen", widen))


@register("wrn16_2")
def build_wrn16_2(input_shape: InputShape, num_classes: int) -> nn.Module:
    """WRN-16-2."""
    return WideResNet(input_shape[0], num_classes, 16, 2)


@register("wrn40_2")
def build_wrn40_2(input_shape: InputShape, num_classes: int) -> nn.Module:
    """WRN-40-2."""
    return WideResNet(input_shape[0], num_classes, 40, 2)


@register("wrn28_10")
def build_wrn28_10(input_shape: InputShape, num_classes: int) -> nn.Module:
    """WRN-28-10."""
    return WideResNet(input_shape[0], num_classes, 28, 10)
