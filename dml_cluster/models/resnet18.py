"""ResNet-18 for small images: 3x3 stride-1 stem, no max-pool, 4 stages of 2 BasicBlocks."""

from __future__ import annotations

import torch
from torch import nn

from dml_cluster.models._common import GlobalAvgPool, init_weights, positive_float
from dml_cluster.models.registry import InputShape, register
from dml_cluster.models.resnet_cifar import make_stage


class ResNet18(nn.Module):
    """Stem conv3x3 -> stages of [2, 2, 2, 2] blocks (strides 1, 2, 2, 2) -> avgpool -> linear.

    Stride-2 3x3 convs with padding 1 map size s to ceil(s/2) >= 1: an 8x8 input ends at 1x1.
    """

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, ch = [], widths[0]
        for out_ch, stride in zip(widths, (1, 2, 2, 2), strict=True):
            stages.append(make_stage(ch, out_ch, 2, stride))
            ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@register("resnet18")
def build_resnet18(input_shape: InputShape, num_classes: int, *, width: float = 1.0) -> nn.Module:
    """ResNet-18 with stage widths `width` x (64, 128, 256, 512)."""
    return ResNet18(input_shape[0], num_classes, positive_float("resnet18", "width", width))
