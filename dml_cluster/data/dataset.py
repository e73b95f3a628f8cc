"""The in-memory dataset container shared by every loader."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset held as tensors: images normalised per channel with train statistics."""

    name: str
    train_x: Tensor = field(repr=False)
    train_y: Tensor = field(repr=False)
    test_x: Tensor = field(repr=False)
    test_y: Tensor = field(repr=False)
    num_classes: int
    class_names: tuple[str, ...]
    flip: bool

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.ndim != 4 or x.dtype != torch.float32:
                raise ValueError(f"{self.name}: {split}_x must be float32 [N, C, H, W]")
            if y.ndim != 1 or y.dtype != torch.int64 or y.shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: {split}_y must be int64 [N] matching {split}_x")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(f"{self.name}: train and test images differ in shape")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (C, H, W)."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @classmethod
    def from_raw(
        cls,
        name: str,
        train_x: Tensor,
        train_y: Tensor,
        test_x: Tensor,
        test_y: Tensor,
        class_names: tuple[str, ...],
        flip: bool,
    ) -> Dataset:
        """Build a dataset from raw [N, C, H, W] pixels, normalising both splits by train stats."""
        train_f, test_f = normalise(train_x, test_x)
        return cls(
            name=name,
            train_x=train_f,
            train_y=train_y.to(torch.int64),
            test_x=test_f,
            test_y=test_y.to(torch.int64),
            num_classes=len(class_names),
            class_names=tuple(class_names),
            flip=flip,
        )


def normalise(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Return float32 copies of both splits with the train split's per-channel mean/std removed."""
    train_f = train_x.to(torch.float32, copy=True)
    test_f = test_x.to(torch.float32, copy=True)
    std, mean = torch.std_mean(train_f, dim=(0, 2, 3), correction=0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    for x in (train_f, test_f):
        x.sub_(mean).div_(std)
    return train_f, test_f
