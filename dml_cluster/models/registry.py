"""Name -> builder registry for the model zoo.

A builder has the signature ``builder(input_shape, num_classes, *, <options>) -> nn.Module``;
its keyword-only options (all with defaults) are what ``build_model`` accepts as ``**kwargs``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from dml_cluster.errors import ConfigError

InputShape = tuple[int, int, int]
Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register `builder` under `name` (a duplicate name is a programming error)."""

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        params = list(inspect.signature(builder).parameters.values())
        positional = [p for p in params if p.kind is not p.KEYWORD_ONLY]
        if len(positional) != 2 or any(p.kind is p.VAR_KEYWORD for p in params):
            raise TypeError(
                f"builder for '{name}' must be f(input_shape, num_classes, *, options...)"
            )
        _REGISTRY[name] = builder
        _OPTIONS[name] = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        return builder

    return decorator


def model_names() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options the model `name` accepts."""
    _lookup(name)
    return _OPTIONS[name]


def _lookup(name: str) -> Builder:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}' (known: {', '.join(model_names())})") from None


def _check_input_shape(name: str, input_shape: Any) -> InputShape:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            f"model '{name}': input_shape must be (channels, height, width) of positive ints, "
            f"got {input_shape!r}"
        )
    return shape  # type: ignore[return-value]


def build_model(name: str, input_shape: InputShape, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` for inputs [B, *input_shape] -> logits [B, num_classes].

    Raises ConfigError for an unknown name, an option the model does not take, or a bad value.
    """
    builder = _lookup(name)
    unexpected = sorted(set(kwargs) - set(_OPTIONS[name]))
    if unexpected:
        accepted = ", ".join(_OPTIONS[name]) or "none"
        bad = ", ".join(f"'{k}'" for k in unexpected)
        raise ConfigError(f"model '{name}' got unexpected argument {bad} (accepted: {accepted})")
    shape = _check_input_shape(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"model '{name}': num_classes must be a positive int, got {num_classes!r}"
        )
    return builder(shape, num_classes, **kwargs)
