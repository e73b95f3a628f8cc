"""The "python" dataset: the user's own code builds the splits (`data.factory`).

Contract: `data.factory: "package.module:function"` names a function called as
`function(root, **data.options)` (root: `data.root`, may be None) that returns
`(train, test, num_classes)` or `(train, test, num_classes, class_names)`. `train` and `test`
are map-style datasets (`len()` and `[i]`) whose items are `(image, label)`: the image a tensor
[C, H, W] (uint8 pixels, or float) or a Pillow image, the label an int in 0..num_classes-1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from dml_cluster.data.dataset import Dataset, Normalisation
from dml_cluster.data.images import AsImages
from dml_cluster.errors import ConfigError, DataError, typed_first_line
from dml_cluster.importing import load_callable

CONTRACT = "it must return (train, test, num_classes[, class_names])"


def _is_map_style(split: Any) -> bool:
    return hasattr(split, "__len__") and hasattr(split, "__getitem__")


def _first_item(split: Any, factory: str) -> Tensor:
    """The first train image as a tensor, after checking the item's form."""
    if len(split) == 0:
        raise DataError(f"data.factory: {factory} returned an empty train split")
    try:
        item = split[0]
    except Exception as err:  # the user's code: any failure is one line
        raise DataError(
            f"data.factory: {factory}: reading train item 0 failed: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise DataError(f"data.factory: {factory}: an item must be (image, label), got {item!r}")
    image, label = item
    if not isinstance(image, Tensor) or image.ndim != 3:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise DataError(
            f"data.factory: {factory}: an item's image must be a tensor [C, H, W] or a Pillow "
            f"image, got {got}"
        )
    if isinstance(label, Tensor):
        label = label.item() if label.numel() == 1 else label
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(
            f"data.factory: {factory}: an item's label must be an int, got {type(label).__name__}"
        )
    return image


def load_python(
    root: str | None = None,
    *,
    factory: str,
    image_size: int | None = None,
    normalize: Mapping[str, Sequence[float]] | None = None,
    **options: Any,
) -> Dataset:
    """Call the user's factory and check what it returns (module docstring: the contract)."""
    try:
        build = load_callable(factory)
    except ConfigError as err:
        raise DataError(f"data.factory: {err}") from None
    try:
        made = build(root, **options)
    except DataError:
        raise
    except Exception as err:  # the user's code: any failure is one line
        raise DataError(
            f"data.factory: {factory}({root!r}, **data.options) failed: {typed_first_line(err)}"
        ) from None
    if not isinstance(made, tuple | list) or len(made) not in (3, 4):
        raise DataError(f"data.factory: {factory} returned {type(made).__name__}; {CONTRACT}")
    train, test, num_classes = made[:3]
    names = made[3] if len(made) == 4 else None
    for split, which in ((train, "train"), (test, "test")):
        if not _is_map_style(split):
            raise DataError(
                f"data.factory: {factory}: the {which} split is a {type(split).__name__}, not "
                f"a dataset with len() and [i]; {CONTRACT}"
            )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise DataError(
            f"data.factory: {factory}: num_classes must be an int >= 2, got {num_classes!r}"
        )
    if names is None:
        names = tuple(f"class_{i}" for i in range(num_classes))
    elif (
        isinstance(names, str)
        or not isinstance(names, Sequence)
        or len(names) != num_classes
        or not all(isinstance(n, str) for n in names)
    ):
        raise DataError(
            f"data.factory: {factory}: class_names must be {num_classes} strings, got {names!r}"
        )
    train, test = AsImages(train, image_size), AsImages(test, image_size)
    first = _first_item(train, factory)
    if len(test) == 0:
        raise DataError(f"data.factory: {factory} returned an empty test split")
    stats = None
    if normalize is not None:
        scale = 1.0 if first.dtype.is_floating_point else 255.0  # uint8 pixels: [0, 1] units
        stats = Normalisation(
            tuple(scale * m for m in normalize["mean"]), tuple(scale * s for s in normalize["std"])
        )
    return Dataset(
        name="python",
        train=train,
        test=test,
        num_classes=num_classes,
        class_names=tuple(names),
        input_shape=(int(first.shape[0]), int(first.shape[1]), int(first.shape[2])),
        flip=False,
        normalisation=stats,
        source={"factory": factory, "root": root, "options": dict(options)},
    )
