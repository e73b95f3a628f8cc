"""The "digits" dataset: scikit-learn's bundled 8x8 handwritten digits (1797 images, 0..16).

The stratified split is scikit-learn's; importing scikit-learn costs about a second of CPU in
every process that loads the digits, so each split is also kept, once made, as a small `.npz`
file (a few hundred kB) under the user's cache folder (`$DML_CLUSTER_CACHE`, else
`$XDG_CACHE_HOME/dml-cluster`, else `~/.cache/dml-cluster`), named by the scikit-learn version,
the test fraction and the seed. A cache that cannot be written or read is skipped.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import zipfile
from pathlib import Path

import numpy as np
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
    cached = split_cache_file(float(test_fraction), split_seed)
    split = read_split(cached) if cached is not None else None
    if split is None:
        split = make_split(float(test_fraction), split_seed)
        if cached is not None:
            write_split(cached, split)
    x_tr, x_te, y_tr, y_te = split

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


SPLIT_KEYS = ("x_train", "x_test", "y_train", "y_test")


def make_split(test_fraction: float, split_seed: int) -> tuple[np.ndarray, ...]:
    """scikit-learn's stratified, seeded split of its bundled digits."""
    # imported here, not with the module: every process imports the data registry (the config
    # names datasets), most never load the digits (torchrun's launcher, k8s render, config show)
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    images, labels = _sk_load_digits(return_X_y=True)
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
        )
    except ValueError as exc:
        raise DataError(f"digits: cannot split with test_fraction={test_fraction}: {exc}") from exc
    return (x_tr.astype(np.uint8), x_te.astype(np.uint8), y_tr, y_te)


def cache_folder() -> Path:
    """Where made splits are kept (see the module docstring)."""
    if os.environ.get("DML_CLUSTER_CACHE"):
        return Path(os.environ["DML_CLUSTER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dml-cluster"


def split_cache_file(test_fraction: float, split_seed: int) -> Path | None:
    """The cache file of one split, or None when scikit-learn's version cannot be read."""
    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        return None
    return cache_folder() / f"digits-sklearn{version}-test{test_fraction!r}-seed{split_seed}.npz"


def read_split(path: Path) -> tuple[np.ndarray, ...] | None:
    """A cached split, or None if there is none or it cannot be read as one."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            split = tuple(arrays[key] for key in SPLIT_KEYS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    x_tr, x_te, y_tr, y_te = split
    if x_tr.shape[0] != y_tr.shape[0] or x_te.shape[0] != y_te.shape[0]:
        return None
    return split


def write_split(path: Path, split: tuple[np.ndarray, ...]) -> None:
    """Keep a split for the next process; atomic (written aside, then renamed); best effort."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **dict(zip(SPLIT_KEYS, split, strict=True)))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
