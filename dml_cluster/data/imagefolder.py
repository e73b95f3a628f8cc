"""The "imagefolder" dataset: root/train/<class>/*.png|jpg and root/val/ (or root/test/), read
with torchvision's DatasetFolder and decoded with Pillow in the loader's workers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset as TorchDataset

from dml_cluster.data.dataset import Dataset, Normalisation
from dml_cluster.data.images import IMAGE_EXTENSIONS, DecodeImage
from dml_cluster.errors import DataError
from dml_cluster.vision import import_torchvision

TEST_SPLITS = ("val", "test")
LAYOUT = "root/train/<class>/<image> and root/val/<class>/<image> (or root/test/...)"


def _classes(train: Path) -> list[str]:
    """The class folders of the train split, sorted."""
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data.root: {train} has no class folders (expected {LAYOUT})")
    return classes


def _check_every_class_has_images(train: FolderSplit, folder: Path, classes: list[str]) -> None:
    found = set(train.targets)
    for index, name in enumerate(classes):
        if index not in found:
            raise DataError(
                f"data.root: class folder {folder / name} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder"
            )


class FolderSplit(TorchDataset):
    """One split: its files found by torchvision's DatasetFolder (the train split's class
    indices), each decoded when read (`DecodeImage`)."""

    def __init__(self, folder: Path, class_to_idx: Mapping[str, int], size: int | None) -> None:
        unknown = sorted(
            p.name for p in folder.iterdir() if p.is_dir() and p.name not in class_to_idx
        )
        if unknown:
            raise DataError(
                f"data.root: {folder} has class folders the train split lacks: {', '.join(unknown)}"
            )
        finder = import_torchvision().datasets.DatasetFolder.make_dataset
        self.samples: list[tuple[str, int]] = finder(
            str(folder), dict(class_to_idx), IMAGE_EXTENSIONS, allow_empty=True
        )
        if not self.samples:
            raise DataError(f"data.root: {folder} holds no images (expected {LAYOUT})")
        self.targets = [target for _, target in self.samples]
        self.loader = DecodeImage(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, target = self.samples[index]
        return self.loader(path), target


def load_imagefolder(
    root: str | None = None,
    *,
    image_size: int | None = None,
    normalize: Mapping[str, Sequence[float]] | None = None,
) -> Dataset:
    """Train and test splits of an image folder; classes are the train split's folder names.

    `image_size`: shorter side resized to it, centre crop square (None: every image must have
    one size already). `normalize`: {mean, std} in pixel values scaled to [0, 1]; None: computed
    from the train split when the run starts (and recorded in the run folder).
    """
    if root is None:
        raise DataError(f"data.root: imagefolder needs the folder that holds {LAYOUT}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root: {base} is not a folder (expected {LAYOUT})")
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DataError(f"data.root: {base} has no train/ folder (expected {LAYOUT})")
    test_dir = next((base / s for s in TEST_SPLITS if (base / s).is_dir()), None)
    if test_dir is None:
        raise DataError(f"data.root: {base} has no val/ or test/ folder (expected {LAYOUT})")
    classes = _classes(train_dir)
    class_to_idx = {name: i for i, name in enumerate(classes)}
    train = FolderSplit(train_dir, class_to_idx, image_size)
    _check_every_class_has_images(train, train_dir, classes)
    test = FolderSplit(test_dir, class_to_idx, image_size)
    first = train.loader(train.samples[0][0])
    stats = None
    if normalize is not None:
        if len(normalize["mean"]) != first.shape[0]:
            raise DataError(
                f"data.normalize: {len(normalize['mean'])} values for {first.shape[0]} channels"
            )
        stats = Normalisation(
            tuple(255.0 * m for m in normalize["mean"]), tuple(255.0 * s for s in normalize["std"])
        )
    return Dataset(
        name="imagefolder",
        train=train,
        test=test,
        num_classes=len(classes),
        class_names=tuple(classes),
        input_shape=(int(first.shape[0]), int(first.shape[1]), int(first.shape[2])),
        flip=True,
        normalisation=stats,
        source={"root": str(base.resolve()), "test": test_dir.name, "image_size": image_size},
    )
