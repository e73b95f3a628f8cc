"""Model factories for tests/test_models_external.py: a user's own models, named in configs as
`tests.model_factories:<name>`, and the ways a factory can be wrong."""

from __future__ import annotations

from torch import nn

NOT_CALLABLE = 3


def tiny_net(num_classes: int, input_shape: tuple[int, int, int], width: int = 8) -> nn.Module:
    """Flatten -> Linear(width) -> ReLU -> Linear(num_classes): the factory contract."""
    channels, height, width_px = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * height * width_px, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def not_a_module(num_classes: int) -> str:
    return f"a network of {num_classes} classes"


def broken(num_classes: int) -> nn.Module:
    raise ValueError("boom")


def dropout_net(
    num_classes: int, input_shape: tuple[int, int, int], width: int = 16, p: float = 0.5
) -> nn.Module:
    """tiny_net with `nn.Dropout(p)` after its hidden layer: a random mask at every training
    forward (the stochastic peers of tests/test_multiprocess.py)."""
    channels, height, width_px = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * height * width_px, width),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(width, num_classes),
    )
