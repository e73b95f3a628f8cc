"""CIFAR-10 and CIFAR-100 from the official binary distribution in a local folder.

Read here, not by torchvision: torchvision's CIFAR10/CIFAR100 read only the python version
(cifar-10-batches-py), whose files are pickles, and this project unpickles nothing it did not
write; the binary version is plain records of label bytes and pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dml_cluster.data.dataset import Dataset
from dml_cluster.errors import DataError

_PIXELS = 3 * 32 * 32
_HOW_TO_GET = "download the binary version from https://www.cs.toronto.edu/~kriz/cifar.html"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and how its records are laid out."""

    name: str
    subfolder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int  # label bytes before the pixels; the last one is the label used
    class_names: tuple[str, ...]

    @property
    def record_size(self) -> int:
        return self.label_bytes + _PIXELS


CIFAR10 = CifarLayout(
    name="cifar10",
    subfolder="cifar-10-batches-bin",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_files=("test_batch.bin",),
    label_bytes=1,
    class_names=CIFAR10_CLASSES,
)
CIFAR100 = CifarLayout(
    name="cifar100",
    subfolder="cifar-100-binary",
    train_files=("train.bin",),
    test_files=("test.bin",),
    label_bytes=2,  # coarse label, then fine label
    class_names=CIFAR100_CLASSES,
)


def _folder(layout: CifarLayout, root: str | None) -> Path:
    """The folder holding the files: `root` itself or its official sub-folder."""
    expected = ", ".join(layout.train_files + layout.test_files)
    if root is None:
        raise DataError(
            f"{layout.name}: set data.root to a folder holding {expected}; {_HOW_TO_GET}"
        )
    base = Path(root)
    for folder in (base, base / layout.subfolder):
        if all((folder / f).is_file() for f in layout.train_files + layout.test_files):
            return folder
    raise DataError(
        f"{layout.name}: {expected} not all found in {base} or {base / layout.subfolder}; "
        f"{_HOW_TO_GET}"
    )


def read_records(layout: CifarLayout, path: Path) -> tuple[Tensor, Tensor]:
    """Read one binary batch file: uint8 images [N, 3, 32, 32] (RGB planes) and int64 labels."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{layout.name}: cannot read {path}: {exc}") from exc
    if not data or len(data) % layout.record_size:
        raise DataError(
            f"{layout.name}: {path} is truncated or malformed ({len(data)} bytes is not a "
            f"multiple of the {layout.record_size}-byte record)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, layout.record_size)
    labels = torch.from_numpy(records[:, layout.label_bytes - 1].astype(np.int64))
    images = torch.from_numpy(records[:, layout.label_bytes :].copy()).reshape(-1, 3, 32, 32)
    if int(labels.max()) >= len(layout.class_names):
        raise DataError(
            f"{layout.name}: {path} has labels outside 0..{len(layout.class_names) - 1}"
        )
    return images, labels


def _read_split(layout: CifarLayout, folder: Path, files: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    parts = [read_records(layout, folder / f) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def load_cifar(layout: CifarLayout, root: str | None) -> Dataset:
    """Load one CIFAR variant from its binary files."""
    folder = _folder(layout, root)
    train_x, train_y = _read_split(layout, folder, layout.train_files)
    test_x, test_y = _read_split(layout, folder, layout.test_files)
    return Dataset.from_raw(
        name=layout.name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        class_names=layout.class_names,
        flip=True,
    )


def load_cifar10(root: str | None = None) -> Dataset:
    """CIFAR-10: data_batch_1..5.bin and test_batch.bin, optionally in cifar-10-batches-bin/."""
    return load_cifar(CIFAR10, root)


def load_cifar100(root: str | None = None) -> Dataset:
    """CIFAR-100 (fine labels): train.bin and test.bin, optionally in cifar-100-binary/."""
    return load_cifar(CIFAR100, root)
