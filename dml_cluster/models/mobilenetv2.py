"""MobileNetV2 (Sandler et al. 2018), CIFAR variant.

The stem and the first two stages keep stride 1 (ImageNet uses 2, 2 there), so a 32x32
input is downsampled 8x overall; 3x3 stride-2 depthwise convs with padding 1 never shrink a
feature map below 1x1, so 8x8 inputs work too.
"""

from __future__ import annotations

import torch
from torch import nn

from dml_cluster.models._common import GlobalAvgPool, init_weights, positive_float
from dml_cluster.models.registry import InputShape, register

# (expansion t, output channels c, repeats n, first stride s), as in the paper's table 2,
# with the stride of the second stage lowered from 2 to 1 for 32x32 inputs.
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round `value` to a multiple of `divisor`, never dropping more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """conv (same padding, no bias) -> BN."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_ch)]


class InvertedResidual(nn.Module):
    """1x1 expand -> ReLU6 -> 3x3 depthwise -> ReLU6 -> 1x1 linear projection (+ identity)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_bn(in_ch, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += conv_bn(hidden, out_ch, 1)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem conv3x3 (stride 1) -> inverted residual stages -> 1x1 conv -> avgpool -> linear."""

    def __init__(self, in_channels: int, num_classes: int, width_mult: float = 1.0) -> None:
        super().__init__()
        ch = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        self.stem = nn.Sequential(*conv_bn(in_channels, ch, 3), nn.ReLU6(inplace=True))
        blocks: list[nn.Module] = []
        for t, c, n, s in STAGES:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(ch, out_ch, s if i == 0 else 1, t))
                ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*conv_bn(ch, last, 1), nn.ReLU6(inplace=True))
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(out), 1))


@register("mobilenetv2")
def build_mobilenetv2(
    input_shape: InputShape, num_classes: int, *, width_mult: float = 1.0
) -> nn.Module:
    """MobileNetV2 with channel multiplier `width_mult`."""
    width_mult = positive_float("mobilenetv2", "width_mult", width_mult)
    return MobileNetV2(input_shape[0], num_classes, width_mult)
