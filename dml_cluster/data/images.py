"""Decoding images for the data path: Pillow -> (resize + centre crop) -> uint8 tensor [C, H, W].

Runs in the loader's worker processes. Decoding is deterministic (no random draw), so which
worker decodes which file never changes a batch; the random augmentation happens per batch on
the peer's device (augment.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dml_cluster.errors import DataError
from dml_cluster.vision import import_torchvision

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def fit(image: Image.Image, size: int | None) -> Image.Image:
    """Resize the shorter side to `size` and crop the centre `size` x `size` (None: as is)."""
    if size is None:
        return image
    f = import_torchvision().transforms.functional
    return f.center_crop(f.resize(image, size), [size, size])


def to_tensor(image: Image.Image) -> Tensor:
    """A Pillow image as a uint8 tensor [C, H, W] (RGB: 3 channels, L: 1)."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class UnreadableImage(DataError):
    """An image file Pillow cannot read: the file, why, and the one line naming both."""

    def __init__(self, path: str | Path, why: str) -> None:
        super().__init__(f"{path}: cannot read the image ({why}); replace or remove the file")
        self.path, self.why = path, why

    def __reduce__(self) -> tuple[Any, ...]:  # picklable from a loader worker
        return (type(self), (self.path, self.why))


class DecodeImage:
    """The loader of an image file: RGB, fitted to `size`, as uint8 [3, H, W]; a file Pillow
    cannot read is one `UnreadableImage` line naming it."""

    def __init__(self, size: int | None) -> None:
        self.size = size

    def __call__(self, path: str | Path) -> Tensor:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            said = str(err) if str(path) not in str(err) else ""  # Pillow often repeats the path
            why = f"{type(err).__name__}: {said}" if said else type(err).__name__
            raise UnreadableImage(path, why) from None
        return to_tensor(fit(rgb, self.size))


class AsImages:
    """A user's split whose items may be Pillow images: items become (uint8 tensor, label),
    fitted to `size`; tensor items pass as they are (resized too when `size` is set)."""

    def __init__(self, split: Any, size: int | None) -> None:
        self.split, self.size = split, size
        for attribute in ("targets", "samples"):
            if hasattr(split, attribute):
                setattr(self, attribute, getattr(split, attribute))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.split[index]
        if isinstance(image, Image.Image):
            mode = "L" if image.mode in ("1", "L", "I", "F") else "RGB"
            image = to_tensor(fit(image.convert(mode), self.size))
        elif isinstance(image, Tensor) and self.size is not None and image.ndim == 3:
            f = import_torchvision().transforms.functional
            image = f.center_crop(f.resize(image, [self.size]), [self.size, self.size])
        return image, label
