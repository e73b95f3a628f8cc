"""Model zoo: every architecture is registered by name and built with `build_model`.

>>> model = build_model("resnet20", (3, 32, 32), num_classes=10)

Each family module registers its builders when imported; all of them are imported here.
"""

from __future__ import annotations

from dml_cluster.models import cnn, mlp, mobilenetv2, resnet18, resnet_cifar, wrn
from dml_cluster.models.registry import (
    InputShape,
    build_model,
    model_names,
    model_options,
    register,
)

__all__ = [
    "InputShape",
    "build_model",
    "cnn",
    "mlp",
    "mobilenetv2",
    "model_names",
    "model_options",
    "register",
    "resnet18",
    "resnet_cifar",
    "wrn",
]
