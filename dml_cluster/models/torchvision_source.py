"""`torchvision.<builder>`: any classification builder of `torchvision.models`, built with
`num_classes` from the data and no pretrained weights (nothing is downloaded; a peer's `weights`
key loads a local state_dict instead).

torchvision's classifiers take 3-channel images. On 1-channel data (MNIST, Fashion-MNIST, digits)
the grey channel is repeated three times in front of the model (a forward pre-hook: the model's
parameters, and so its state_dicts, stay those of the torchvision model); other channel counts
are refused.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from dml_cluster.errors import ConfigError, first_line
from dml_cluster.models.registry import InputShape, ModelSource, close_names, register_source
from dml_cluster.vision import import_torchvision

_DOWNLOADING = ("weights", "weights_backbone")


@functools.cache
def builder_names() -> tuple[str, ...]:
    """The classification builders of the installed torchvision, sorted."""
    tv = import_torchvision()
    return tuple(sorted(tv.models.list_models(module=tv.models)))


def check(name: str) -> None:
    if name not in builder_names():
        raise ConfigError(
            f"unknown model 'torchvision.{name}'{close_names(name, list(builder_names()))} "
            "(torchvision.models.list_models(module=torchvision.models) lists the builders)"
        )


def _grey_to_rgb(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x: Tensor = args[0]
    return (x.expand(-1, 3, -1, -1), *args[1:])


def build(name: str, input_shape: InputShape, num_classes: int, **args: Any) -> nn.Module:
    given = [k for k in _DOWNLOADING if k in args]
    if given:
        raise ConfigError(
            f"model 'torchvision.{name}': args.{given[0]}: pretrained weights are never "
            "downloaded; give the peer a local state_dict with `weights: PATH`"
        )
    channels = input_shape[0]
    if channels not in (1, 3):
        raise ConfigError(
            f"model 'torchvision.{name}' takes 3-channel images (1-channel ones are repeated), "
            f"but the data has {channels} channels"
        )
    tv = import_torchvision()
    try:
        model = tv.models.get_model(name, weights=None, num_classes=num_classes, **args)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"model 'torchvision.{name}' with args {args}: {first_line(err)}"
        ) from None
    if channels == 1:
        model.register_forward_pre_hook(_grey_to_rgb)
    return model


register_source("torchvision", ModelSource(form="torchvision.<builder>", check=check, build=build))
