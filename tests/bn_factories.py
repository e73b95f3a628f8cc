"""A model factory for tests/test_bn_at_chance.py: BatchNorm whose running statistics barely move
(tiny momentum) after pre-activations far from their initial mean 0, so a few dozen steps give
high training accuracy and chance in evaluation (torchvision's mobilenet_v3_small on 32x32
images, in miniature)."""

from __future__ import annotations

import torch
from torch import nn


def lagging_bn_net(
    num_classes: int, input_shape: tuple[int, int, int], momentum: float = 0.001, width: int = 32
) -> nn.Module:
    """Flatten -> Linear (bias 100: pre-activations far from BatchNorm's initial running mean)
    -> BatchNorm1d(momentum) -> ReLU -> Linear(num_classes)."""
    channels, height, width_px = input_shape
    hidden = nn.Linear(channels * height * width_px, width)
    with torch.no_grad():
        hidden.bias.fill_(100.0)
    return nn.Sequential(
        nn.Flatten(), hidden, nn.BatchNorm1d(width, momentum=momentum), nn.ReLU(),
        nn.Linear(width, num_classes),
    )  # fmt: skip
