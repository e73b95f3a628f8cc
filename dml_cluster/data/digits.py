"""The "digits" dataset: scikit-learn's bundled 8x8 handwritten digits (1797 images, 0..16)."""

from __future__ import annotations

import torch

from dml_cluster.data.dataset import Dataset
from dml_cluster.errors import DataError


def load_digits(
    root: str | None = None, *, test_fraction: float = 0.2, split_seed: int = 0
) -> Dataset:
    """Load the digits and split them, stratified and seeded; `root` is unused (data is bundled)."""
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise DataError(f"digits: test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
        raise DataError(f"digits: split_seed must be an integer, got {split_seed!r}")
    # imported here, not with the module: every process imports the data registry (the config
    # names datasets), most never load the digits (torchrun's launcher, k8s render, config show)
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    images, labels = _sk_load_digits(return_X_y=True)
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            images,
            labels,
            test_size=float(test_fraction),
            random_state=split_seed,
            stratify=labels,
        )
    except ValueError as exc:
        raise DataError(f"digits: cannot split with test_fraction={test_fraction}: {exc}") from exc

    def to_images(a: object) -> torch.Tensor:  # whole numbers 0..16: kept as uint8
        return torch.as_tensor(a).to(torch.uint8).reshape(-1, 1, 8, 8)

    return Dataset.from_raw(
        name="digits",
        train_x=to_images(x_tr),
        train_y=torch.as_tensor(y_tr, dtype=torch.int64),
        test_x=to_images(x_te),
        test_y=torch.as_tensor(y_te, dtype=torch.int64),
        class_names=tuple(str(d) for d in range(10)),
        flip=False,
    )
