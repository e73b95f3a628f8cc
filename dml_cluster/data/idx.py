"""MNIST-style datasets stored in the IDX format ("mnist", "fashion-mnist"), plain or gzipped."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dml_cluster.data.dataset import Dataset
from dml_cluster.errors import DataError

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
MNIST_ROOT = "/usr/share/datasets/mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))


def read_idx(path: str | Path) -> Tensor:
    """Read one IDX file (gzipped if its name ends in .gz) into a tensor of its stored dtype."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path} has a malformed IDX header ({ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims, dtype=np.int64))
    expected = count * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise DataError(f"{path} is truncated: {found} data bytes, header says {expected}")
    if found > expected:
        raise DataError(f"{path} is malformed: {found - expected} bytes past the declared data")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="))).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    """The file for `stem` in `folder`, also as '.gz' or in the 'x.idx3-ubyte' spelling."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _torchvision_layout(folder: Path, tv_name: str) -> bool:
    """Does `folder` hold torchvision's layout (<folder>/<tv_name>/raw/, files uncompressed)?"""
    raw = folder / tv_name / "raw"
    return all((raw / stem).is_file() for stem in _FILES.values())


def _read_with_torchvision(folder: Path, tv_name: str) -> dict[str, Tensor]:
    """The four arrays read by torchvision's MNIST / FashionMNIST dataset."""
    from dml_cluster.vision import import_torchvision

    cls = getattr(import_torchvision().datasets, tv_name)
    arrays = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(folder), train=train, download=False)
        except (OSError, RuntimeError, ValueError) as err:
            raise DataError(
                f"{tv_name}: torchvision cannot read {folder / tv_name}: {err}"
            ) from err
        arrays[f"{split}_x"], arrays[f"{split}_y"] = ds.data, ds.targets
    return arrays


def load_idx_dataset(
    name: str, folder: Path, class_names: tuple[str, ...], how_to_get: str, tv_name: str
) -> Dataset:
    """Load the four standard IDX files from `folder` as a 1-channel dataset.

    torchvision's reader where `folder` has its layout (<folder>/<tv_name>/raw/, as its
    download=True leaves it); the reader of this module for the flat layouts torchvision cannot
    read: the four files directly in `folder`, gzipped or not (Debian's dataset-fashion-mnist
    package at /usr/share/datasets/fashion-mnist, the files as the MNIST site serves them).
    """
    if _torchvision_layout(folder, tv_name):
        arrays = _read_with_torchvision(folder, tv_name)
        return _checked(
            name, arrays, {k: folder / tv_name / "raw" / v for k, v in _FILES.items()}, class_names
        )
    expected = ", ".join(_FILES.values())
    if not folder.is_dir():
        raise DataError(
            f"{name}: folder {folder} not found (expected {expected}, optionally .gz); {how_to_get}"
        )
    paths: dict[str, Path] = {}
    for key, stem in _FILES.items():
        found = _find(folder, stem)
        if found is None:
            raise DataError(
                f"{name}: {stem}[.gz] missing in {folder} (expected {expected}); {how_to_get}"
            )
        paths[key] = found
    arrays = {key: read_idx(path) for key, path in paths.items()}
    return _checked(name, arrays, paths, class_names)


def _checked(
    name: str, arrays: dict[str, Tensor], paths: dict[str, Path], class_names: tuple[str, ...]
) -> Dataset:
    """The dataset of the four arrays, after checking they are images and labels that match."""
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"{name}: {paths[f'{split}_x'].name} {tuple(x.shape)} and "
                f"{paths[f'{split}_y'].name} {tuple(y.shape)} do not match as images and labels"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(class_names)):
            raise DataError(
                f"{name}: {paths[f'{split}_y']} has labels outside 0..{len(class_names) - 1}"
            )
    return Dataset.from_raw(
        name=name,
        train_x=arrays["train_x"].unsqueeze(1),
        train_y=arrays["train_y"].to(torch.int64),
        test_x=arrays["test_x"].unsqueeze(1),
        test_y=arrays["test_y"].to(torch.int64),
        class_names=class_names,
        flip=False,
    )


def load_fashion_mnist(root: str | None = None) -> Dataset:
    """Fashion-MNIST (60000 + 10000 images 28x28, 10 classes) from IDX files in `root`."""
    return load_idx_dataset(
        "fashion-mnist",
        Path(root or FASHION_MNIST_ROOT),
        FASHION_MNIST_CLASSES,
        "run 'apt-get install dataset-fashion-mnist' or set data.root to a folder holding them",
        "FashionMNIST",
    )


def load_mnist(root: str | None = None) -> Dataset:
    """MNIST (60000 + 10000 images 28x28, 10 digits) from IDX files in `root`."""
    return load_idx_dataset(
        "mnist",
        Path(root or MNIST_ROOT),
        MNIST_CLASSES,
        "download them from http://yann.lecun.com/exdb/mnist/ and set data.root to their folder",
        "MNIST",
    )
