"""`model: searched`: the network an architecture spec of the search space describes.

Stem (3x3 conv, BN, ReLU) -> the spec's blocks -> head (1x1 conv, BN, ReLU) -> global average
pool -> linear. Each block is `layers` layers of its operation; only the first layer has the
block's stride and changes the channel count, and a layer adds its input back (identity skip)
when the block asks for it and the shapes allow it (stride 1, same channels), as in MnasNet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dml_cluster.errors import ConfigError
from dml_cluster.models._common import init_weights
from dml_cluster.models.registry import InputShape, register
from dml_cluster.search.space import Arch, BlockSpec


def conv_bn_relu(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> list[nn.Module]:
    """conv (same padding, no bias) -> BN (-> ReLU)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_ch)] + ([nn.ReLU(inplace=True)] if relu else [])


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(gate))))
        return x * gate


def _se(channels: int, in_ch: int, ratio: float) -> list[nn.Module]:
    """An SE module on `channels`, its bottleneck `ratio` of the layer's input channels."""
    return [SqueezeExcite(channels, max(1, int(in_ch * ratio)))] if ratio > 0 else []


def _conv(in_ch: int, out_ch: int, stride: int, b: BlockSpec) -> list[nn.Module]:
    return [*conv_bn_relu(in_ch, out_ch, b.kernel, stride), *_se(out_ch, in_ch, b.se)]


def _dwsep(in_ch: int, out_ch: int, stride: int, b: BlockSpec) -> list[nn.Module]:
    return [
        *conv_bn_relu(in_ch, in_ch, b.kernel, stride, groups=in_ch),
        *_se(in_ch, in_ch, b.se),
        *conv_bn_relu(in_ch, out_ch, 1, relu=False),
    ]


def _mbconv(in_ch: int, out_ch: int, stride: int, b: BlockSpec) -> list[nn.Module]:
    hidden = in_ch * b.expansion
    expand = conv_bn_relu(in_ch, hidden, 1) if b.expansion != 1 else []
    return [
        *expand,
        *conv_bn_relu(hidden, hidden, b.kernel, stride, groups=hidden),
        *_se(hidden, in_ch, b.se),
        *conv_bn_relu(hidden, out_ch, 1, relu=False),
    ]


LAYERS = {"conv": _conv, "dwsep": _dwsep, "mbconv": _mbconv}
"""op name -> the modules of one layer (in_ch, out_ch, stride, block spec)."""


class Layer(nn.Module):
    """One layer of a block, with its identity skip where the block asks and shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, block: BlockSpec) -> None:
        super().__init__()
        self.body = nn.Sequential(*LAYERS[block.op](in_ch, out_ch, stride, block))
        self.residual = block.skip == "identity" and stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class SearchedNet(nn.Module):
    """The model of an `Arch`; `self.arch` is the spec it was built from."""

    def __init__(self, input_shape: InputShape, num_classes: int, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        self.stem = nn.Sequential(*conv_bn_relu(input_shape[0], arch.stem, 3))
        layers: list[nn.Module] = []
        ch = arch.stem
        for block in arch.blocks:
            for i in range(block.layers):
                layers.append(Layer(ch, block.channels, block.stride if i == 0 else 1, block))
                ch = block.channels
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(*conv_bn_relu(ch, arch.head, 1))
        self.fc = nn.Linear(arch.head, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.fc(out.mean((2, 3)))  # global average pool (deterministic backward)


@register("searched")
def build_searched(input_shape: InputShape, num_classes: int, *, arch: Any = None) -> nn.Module:
    """The network of `arch`, a spec of the search space (e.g. a search's best.yaml)."""
    if arch is None:
        raise ConfigError(
            "model 'searched' needs args.arch (e.g. the arch of a search's best.yaml)"
        )
    return SearchedNet(input_shape, num_classes, Arch.from_dict(arch))
