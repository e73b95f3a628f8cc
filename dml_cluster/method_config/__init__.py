"""The `method` section of a config: one settings model per method family, next to it in name
(methods/dml.py learns with method_config/dml.py's settings), torch-free so that loading a
config never imports a network.

`MethodConfig` is the union of the families, discriminated on `method.name`: a key of another
method is an error naming it. A new method family adds its settings file here and its entry to
`MethodConfig`, and its loss to `dml_cluster.methods`.
"""

from __future__ import annotations

from typing import Annotated, Any, get_args

from pydantic import Field

from dml_cluster.method_config.at import ATConfig
from dml_cluster.method_config.base import MethodSettings
from dml_cluster.method_config.dkd import DKDConfig
from dml_cluster.method_config.dml import DMLConfig
from dml_cluster.method_config.fitnets import FitNetsConfig
from dml_cluster.method_config.kd import KDConfig

MethodConfig = Annotated[
    DMLConfig | KDConfig | DKDConfig | FitNetsConfig | ATConfig, Field(discriminator="name")
]
"""The registry of method families: one entry per settings model."""

DEFAULT_METHOD = "dml"
"""The method of a config without a `method.name`."""

FAMILIES: tuple[type[MethodSettings], ...] = get_args(get_args(MethodConfig)[0])


def method_names() -> list[str]:
    return sorted(name for family in FAMILIES for name in family.names())


def family_of(name: str) -> type[MethodSettings]:
    """The settings model of method `name` (a KeyError for an unknown one)."""
    return next(f for f in FAMILIES if name in f.names())


def unknown_key(name: str, key: Any) -> str:
    """Why `key` is not a setting of method `name`, naming the methods it belongs to."""
    owners = sorted(m for f in FAMILIES if key in f.model_fields for m in f.names())
    takes = ", ".join(k for k in family_of(name).model_fields if k != "name")
    belongs = f"{key} belongs to {', '.join(owners)}; " if owners else ""
    return f"unknown key for method {name!r} ({belongs}{name} takes {takes})"
