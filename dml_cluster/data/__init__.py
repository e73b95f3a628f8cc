"""Data layer: the dataset registry, the one loader path, the shared batch order, seeded
augmentation, label splits."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from dml_cluster.data.augment import augment_batch
from dml_cluster.data.cifar import load_cifar10, load_cifar100
from dml_cluster.data.dataset import Dataset, Normalisation
from dml_cluster.data.digits import load_digits
from dml_cluster.data.factory import load_python
from dml_cluster.data.idx import load_fashion_mnist, load_mnist
from dml_cluster.data.imagefolder import load_imagefolder
from dml_cluster.data.sampler import batch_indices, epoch_order, fingerprint, steps_per_epoch
from dml_cluster.data.split import labelled_mask, mask_labels
from dml_cluster.data.synthetic import load_synthetic
from dml_cluster.errors import DataError

__all__ = [
    "Dataset",
    "Normalisation",
    "augment_batch",
    "batch_indices",
    "dataset_names",
    "epoch_order",
    "fingerprint",
    "labelled_mask",
    "load_dataset",
    "loader_options",
    "mask_labels",
    "steps_per_epoch",
]

# name -> loader(root, **options); each loader declares its options as keyword parameters.
_LOADERS: dict[str, Callable[..., Dataset]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "imagefolder": load_imagefolder,
    "mnist": load_mnist,
    "python": load_python,
    "synthetic": load_synthetic,
}


def dataset_names() -> tuple[str, ...]:
    """Names accepted by `load_dataset`, sorted."""
    return tuple(sorted(_LOADERS))


def dataset_options(name: str) -> tuple[str, ...]:
    """The options (keyword arguments besides `root`) that dataset `name` accepts."""
    params = inspect.signature(_loader(name)).parameters.values()
    return tuple(p.name for p in params if p.name != "root" and p.kind != p.VAR_KEYWORD)


def _takes_any_option(name: str) -> bool:
    """Does dataset `name` pass options it does not name on (the python factory's)?"""
    params = inspect.signature(_loader(name)).parameters.values()
    return any(p.kind == p.VAR_KEYWORD for p in params)


def _loader(name: str) -> Callable[..., Dataset]:
    key = name.strip().lower().replace("_", "-")
    if key == "text":
        raise DataError(
            "data.name: text: token data is read by data/text.py (data.prepare.prepare_data), "
            "not as a dataset of samples"
        )
    if key not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    return _LOADERS[key]


def load_dataset(name: str, root: str | None = None, **options: Any) -> Dataset:
    """Load dataset `name` from `root` (or its default place) with loader-specific options."""
    loader = _loader(name)
    allowed = dataset_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown and not _takes_any_option(name):
        known = ", ".join(allowed) or "none"
        raise DataError(f"dataset {name!r} has no option {', '.join(unknown)}; known: {known}")
    return loader(root, **options)


# data.<key> settings passed to the dataset's loader as keyword options when they are set
_SETTINGS = ("image_size", "factory", "normalize")


def loader_options(data: Any) -> dict[str, Any]:
    """The keyword options a `DataConfig` gives its dataset's loader: `data.options` and the
    settings of `_SETTINGS` that are set (the config checks that the dataset takes them)."""
    options = dict(data.options)
    for key in _SETTINGS:
        value = getattr(data, key, None)
        if value is not None:
            options[key] = value.model_dump() if hasattr(value, "model_dump") else value
    return options
