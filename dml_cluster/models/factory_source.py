"""`package.module:factory`: the user's own model. The factory is called as
`factory(num_classes=N, **args)` (`args`: the peer's `args`), with `input_shape=(C, H, W)` too when
it has a parameter of that name, and must return a torch `nn.Module` mapping [B, C, H, W] to
logits [B, N]. Its module is imported from the installed packages or the current directory."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from dml_cluster.errors import ConfigError, typed_first_line
from dml_cluster.importing import load_callable
from dml_cluster.models.registry import (
    FACTORY_SCHEME,
    InputShape,
    ModelSource,
    register_source,
)


def check(reference: str) -> None:
    try:
        load_callable(reference)
    except ConfigError as err:
        raise ConfigError(f"model factory {err}") from None


def _takes_input_shape(factory: Any) -> bool:
    try:
        return "input_shape" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False


def build(reference: str, input_shape: InputShape, num_classes: int, **args: Any) -> nn.Module:
    factory = load_callable(reference)
    options: dict[str, Any] = {**args, "num_classes": num_classes}
    if _takes_input_shape(factory):
        options["input_shape"] = input_shape
    try:
        return factory(**options)
    except Exception as err:  # noqa: BLE001 - the user's factory failing is one config error
        raise ConfigError(
            f"model factory {reference!r} raised {typed_first_line(err)} "
            f"(called with {sorted(options)})"
        ) from None


register_source(
    FACTORY_SCHEME, ModelSource(form="package.module:factory", check=check, build=build)
)
