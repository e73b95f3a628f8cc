"""The "synthetic" dataset: seeded Gaussian images whose mean depends on the class."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dml_cluster.data.dataset import Dataset
from dml_cluster.errors import DataError


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(f"synthetic: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def load_synthetic(
    root: str | None = None,
    *,
    shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    train_size: int = 1024,
    test_size: int = 256,
    seed: int = 0,
) -> Dataset:
    """Images = class prototype + unit noise, all drawn from one seeded generator; `root` unused."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 3:
        raise DataError(f"synthetic: shape must be [C, H, W], got {shape!r}")
    dims = tuple(_positive_int("shape entries", d) for d in shape)
    num_classes = _positive_int("num_classes", num_classes, minimum=2)
    train_size = _positive_int("train_size", train_size)
    test_size = _positive_int("test_size", test_size)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(f"synthetic: seed must be an integer, got {seed!r}")

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    prototypes = torch.randn((num_classes, *dims), generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = prototypes[y] + torch.randn((n, *dims), generator=g)
        return x, y

    train_x, train_y = draw(train_size)
    test_x, test_y = draw(test_size)
    return Dataset.from_raw(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        flip=False,
    )
