"""Model zoo: every architecture is registered by name and built with `build_model`.

>>> model = build_model("resnet20", (3, 32, 32), 10)  # name, input shape, classes
>>> lm = build_model("gpt", (256,), 257)  # a language model: (block_size,), vocabulary size

Each family module registers its builders when imported; all of them are imported here, and so
are the sources of models built elsewhere: `torchvision.<builder>`, `timm.<name>` (the optional
extra `[timm]`), `hf:PATH` (a Hugging Face transformers causal LM from a local folder; the
optional extra `[hf]`) and `package.module:factory` (the user's own nn.Module).
"""

from __future__ import annotations

from dml_cluster.models import (
    cnn,
    factory_source,
    gpt,
    hf_source,
    mlp,
    mobilenetv2,
    resnet18,
    resnet_cifar,
    searched,
    timm_source,
    torchvision_source,
    wrn,
)
from dml_cluster.models.registry import (
    InputShape,
    ModelSource,
    as_rows,
    build_model,
    check_model_name,
    comes_trained,
    is_builtin,
    is_token_model,
    model_names,
    model_options,
    register,
    register_source,
)

__all__ = [
    "InputShape",
    "ModelSource",
    "as_rows",
    "build_model",
    "check_model_name",
    "comes_trained",
    "cnn",
    "factory_source",
    "gpt",
    "hf_source",
    "is_builtin",
    "is_token_model",
    "mlp",
    "mobilenetv2",
    "model_names",
    "model_options",
    "register",
    "register_source",
    "resnet18",
    "resnet_cifar",
    "searched",
    "timm_source",
    "torchvision_source",
    "wrn",
]
