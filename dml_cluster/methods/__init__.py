"""Learning methods: what a peer minimises given its logits, labels and the others' predictions.

One small file per family; each method registers itself under a name used as `method.name` in
the config. A method is a callable `(logits, target, others) -> LossParts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from dml_cluster.config import MethodConfig
from dml_cluster.errors import ConfigError


@dataclass(frozen=True)
class LossParts:
    """The total loss a peer steps on, and its parts for logging."""

    total: Tensor
    ce: Tensor
    mimicry: Tensor


class Method(Protocol):
    def __call__(self, logits: Tensor, target: Tensor, others: Sequence[Tensor]) -> LossParts: ...


_METHODS: dict[str, Callable[[MethodConfig], Method]] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        _METHODS[name] = cls
        return cls

    return add


def method_names() -> list[str]:
    return sorted(_METHODS)


def build_method(cfg: MethodConfig) -> Method:
    if cfg.name not in _METHODS:
        raise ConfigError(
            f"config error: method.name: unknown method {cfg.name!r} "
            f"(known: {', '.join(method_names())})"
        )
    return _METHODS[cfg.name](cfg)


from dml_cluster.methods import dml  # noqa: E402,F401  (registers the DML family)
