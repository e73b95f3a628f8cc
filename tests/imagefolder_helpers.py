"""A generated ImageFolder for the data path's tests: tiny PNGs whose colour depends on the
class (learnable in a few steps), in root/train/<class>/ and root/val/<class>/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "star", "wave")


def write_imagefolder(
    root: Path,
    per_class: int = 48,
    val_per_class: int = 12,
    size: tuple[int, int] = (12, 10),
    seed: int = 0,
    classes: int = len(CLASSES),
) -> Path:
    """Write `classes` * (per_class + val_per_class) RGB PNGs of `size` (w, h); returns root.
    The class folders are CLASSES, or class00, class01, ... for more than four classes."""
    rng = np.random.default_rng(seed)
    names = (
        CLASSES[:classes] if classes <= len(CLASSES) else [f"class{i:02d}" for i in range(classes)]
    )
    colours = rng.integers(40, 216, size=(classes, 3))
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-40, 41, size=(size[1], size[0], 3))
                pixels = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root
