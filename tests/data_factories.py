"""Dataset factories for tests/test_imagefolder.py: a user's own datasets, named in configs as
`data.factory: tests.data_factories:<name>`, and the ways a factory can be wrong."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .imagefolder_helpers import write_imagefolder


def blobs(root: str | None, n: int = 96, classes: int = 3):
    """uint8 images [1, 6, 6] whose brightness depends on the class: (train, test, classes,
    class names), the factory contract."""
    g = torch.Generator().manual_seed(0)

    def split(size: int) -> TensorDataset:
        y = torch.randint(0, classes, (size,), generator=g)
        x = y.view(-1, 1, 1, 1) * 60 + torch.randint(0, 40, (size, 1, 6, 6), generator=g)
        return TensorDataset(x.to(torch.uint8), y)

    return split(n), split(n // 2), classes, tuple(f"level{i}" for i in range(classes))


def torchvision_folder(root: str | None):
    """torchvision's own ImageFolder (Pillow images, no transform) over a generated folder."""
    from pathlib import Path

    from dml_cluster.vision import import_torchvision

    tv = import_torchvision()
    base = write_imagefolder(Path(root))
    train = tv.datasets.ImageFolder(str(base / "train"))
    return train, tv.datasets.ImageFolder(str(base / "val")), len(train.classes), train.classes


def not_a_tuple(root: str | None) -> dict:
    return {"train": [], "test": []}


def lists_not_datasets(root: str | None):
    return 3, 4, 2


def broken(root: str | None):
    raise RuntimeError("cannot reach the database")
