"""Multi-layer perceptron on the flattened input."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dml_cluster.models._common import init_weights, positive_int
from dml_cluster.models.registry import InputShape, register


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register("mlp")
def build_mlp(
    input_shape: InputShape, num_classes: int, *, hidden: Sequence[int] = (256, 128)
) -> nn.Module:
    """MLP with hidden layer widths `hidden` (default [256, 128])."""
    if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence):
        hidden = [hidden]  # type: ignore[list-item]  # a lone value: let the check below judge
    widths = [positive_int("mlp", "hidden", h) for h in hidden]
    c, h, w = input_shape
    return MLP(c * h * w, num_classes, widths)
