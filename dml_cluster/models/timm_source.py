"""`timm.<name>`: a model of timm (the optional extra `dml-cluster[timm]`), built with
`num_classes` from the data, `in_chans` from the data's channels (unless args give it) and no
pretrained weights (nothing is downloaded; a peer's `weights` key loads a local state_dict)."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from torch import nn

from dml_cluster.errors import ConfigError, first_line
from dml_cluster.models.registry import InputShape, ModelSource, close_names, register_source
from dml_cluster.vision import import_torchvision

_DOWNLOADING = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


@functools.cache
def _timm() -> ModuleType | None:
    import_torchvision()  # timm imports torchvision, which must be loaded our way first
    try:
        import timm
    except ImportError:
        return None
    return timm


def _require(name: str) -> ModuleType:
    timm = _timm()
    if timm is None:
        raise ConfigError(
            f"model 'timm.{name}' needs timm, which is not installed: "
            "pip install 'dml-cluster[timm]' (or pip install timm)"
        )
    return timm


def check(name: str) -> None:
    timm = _require(name)
    if not timm.is_model(name):
        known = timm.list_models()
        raise ConfigError(
            f"unknown model 'timm.{name}'{close_names(name, known)} "
            f"(timm {timm.__version__}: timm.list_models() lists its {len(known)} models)"
        )


def build(name: str, input_shape: InputShape, num_classes: int, **args: Any) -> nn.Module:
    timm = _require(name)
    given = [k for k in _DOWNLOADING if k in args]
    if given:
        raise ConfigError(
            f"model 'timm.{name}': args.{given[0]}: pretrained weights are never downloaded; "
            "give the peer a local state_dict with `weights: PATH`"
        )
    options = {"in_chans": input_shape[0], **args, "num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=False, **options)
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"model 'timm.{name}' with args {args}: {first_line(err)}") from None


register_source("timm", ModelSource(form="timm.<name>", check=check, build=build))
