"""CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of BasicBlocks.

Stage widths are 16/32/64 on a 16-channel stem; the "x4" variants (as used in the CRD and
mdistiller distillation benchmarks) use 64/128/256 on a 32-channel stem. When a block changes
the shape, its shortcut is a 1x1 conv + BN projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dml_cluster.errors import ConfigError
from dml_cluster.models._common import GlobalAvgPool, init_weights
from dml_cluster.models.registry import InputShape, register


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            # A 1x1 stride-s conv (no padding) gives the same output size as the 3x3 padded one.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` BasicBlocks; only the first one may change stride or width."""
    layers = [BasicBlock(in_ch, out_ch, stride)]
    layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """Stem conv3x3 -> 3 stages (strides 1, 2, 2) -> global average pool -> linear.

    Stride-2 3x3 convs with padding 1 map size s to ceil(s/2) >= 1, so 8x8 inputs end at 2x2.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int,
        widths: tuple[int, int, int, int] = (16, 16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        stem_ch, *stage_ch = widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU(inplace=True),
        )
        stages, ch = [], stem_ch
        for out_ch, stride in zip(stage_ch, (1, 2, 2), strict=True):
            stages.append(make_stage(ch, out_ch, n, stride))
            ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


_NARROW = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

# name -> (depth, stem and stage widths)
VARIANTS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (8, _NARROW),
    "resnet20": (20, _NARROW),
    "resnet32": (32, _NARROW),
    "resnet56": (56, _NARROW),
    "resnet110": (110, _NARROW),
    "resnet8x4": (8, _X4),
    "resnet32x4": (32, _X4),
}


def _builder(depth: int, widths: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def build(input_shape: InputShape, num_classes: int) -> nn.Module:
        return CifarResNet(input_shape[0], num_classes, depth, widths)

    build.__doc__ = f"CIFAR ResNet, depth {depth}, widths {widths}."
    return build


for _name, (_depth, _widths) in VARIANTS.items():
    register(_name)(_builder(_depth, _widths))
