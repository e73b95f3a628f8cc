"""A small plain CNN: three conv blocks, global average pool, linear head."""

from __future__ import annotations

import torch
from torch import nn

from dml_cluster.models._common import GlobalAvgPool, init_weights, positive_int
from dml_cluster.models.registry import InputShape, register


class SmallCNN(nn.Module):
    """[conv3x3 -> BN -> ReLU -> maxpool2] x 3 with widths w, 2w, 4w, then avgpool + linear.

    A block's 2x2 pooling is skipped once the feature map is already 1 pixel high or wide, so
    any input size (down to 1x1) works.
    """

    def __init__(self, input_shape: InputShape, num_classes: int, width: int) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        blocks: list[nn.Module] = []
        for out_ch in (width, 2 * width, 4 * width):
            pool: nn.Module = nn.Identity()
            if min(h, w) >= 2:
                pool = nn.MaxPool2d(2)
                h, w = h // 2, w // 2
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(inplace=True),
                    pool,
                )
            )
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


@register("small_cnn")
def build_small_cnn(input_shape: InputShape, num_classes: int, *, width: int = 32) -> nn.Module:
    """Small CNN whose first block has `width` channels (then 2x and 4x)."""
    return SmallCNN(input_shape, num_classes, positive_int("small_cnn", "width", width))
