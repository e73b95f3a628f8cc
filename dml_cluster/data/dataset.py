"""What every loader returns: a dataset's two splits as host-side torch datasets, and its facts.

Images stay compact on the host (uint8 where the source is 8-bit pixels); a batch becomes float32
and normalised only after it reaches the peer's device (`Normalisation.apply`), so no split is
ever expanded to float32 or copied whole onto an accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and std in the units of the stored pixels: x -> (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("normalisation: mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"normalisation: every std must be > 0, got {self.std}")

    @classmethod
    def of(cls, x: Tensor) -> Normalisation:
        """The statistics of a whole [N, C, H, W] split (a channel without spread keeps std 1)."""
        std, mean = torch.std_mean(x.to(torch.float32), dim=(0, 2, 3), correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return cls(tuple(mean.tolist()), tuple(std.tolist()))

    def on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Mean and std as float32 [1, C, 1, 1] tensors on `device` (made once per data path)."""
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape).to(device)
        return mean, torch.tensor(self.std, dtype=torch.float32).view(shape).to(device)

    def apply(self, x: Tensor, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """A float32 copy of the [B, C, H, W] batch `x`, normalised, on `x`'s device (`stats`:
        `on(x.device)`, if already made)."""
        mean, std = stats if stats is not None else self.on(x.device)
        return x.to(torch.float32, copy=True).sub_(mean).div_(std)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


class TensorImages(TorchDataset):
    """A split held in memory: raw images [N, C, H, W] (compact dtype) and int64 labels [N].

    `gather` reads a whole batch with one index operation; the loader prefers it to per-item
    reads."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError("labels must be [N], one per image")
        self.x, self.targets = x, y.to(torch.int64)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.x[index], int(self.targets[index])

    def gather(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.x[idx], self.targets[idx]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset: train and test splits whose items are (image [C, H, W], label), and its facts.

    `normalisation` None: computed from the train split when a run starts (`data.stats`).
    `in_memory`: the splits are tensors in memory, so worker processes would only add copying.
    """

    name: str
    train: Any = field(repr=False)  # a map-style torch Dataset
    test: Any = field(repr=False)
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    flip: bool
    normalisation: Normalisation | None = None
    in_memory: bool = False
    source: dict[str, Any] = field(default_factory=dict)  # where it came from, for the run folder

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )

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
        """An in-memory dataset from raw [N, C, H, W] pixels, normalised by train statistics."""
        if train_x.shape[1:] != test_x.shape[1:]:
            raise ValueError(f"{name}: train and test images differ in shape")
        c, h, w = (int(d) for d in train_x.shape[1:])
        return cls(
            name=name,
            train=TensorImages(train_x, train_y),
            test=TensorImages(test_x, test_y),
            num_classes=len(class_names),
            class_names=tuple(class_names),
            input_shape=(c, h, w),
            flip=flip,
            normalisation=Normalisation.of(train_x),
            in_memory=True,
        )


def targets(split: Any) -> Tensor:
    """The int64 labels of a split: its `targets` attribute (torchvision's datasets, ours), or
    else read item by item (a user's dataset without one: one pass over it)."""
    found = getattr(split, "targets", None)
    if found is None:
        found = [int(split[i][1]) for i in range(len(split))]
    return torch.as_tensor(found, dtype=torch.int64)


class Picked(TorchDataset):
    """Some samples of a split, by index (a training subset); keeps `targets` and `samples`."""

    def __init__(self, split: Any, keep: Sequence[int]) -> None:
        self.split, self.keep = split, [int(i) for i in keep]
        self.targets = targets(split)[torch.as_tensor(self.keep, dtype=torch.int64)]
        samples = getattr(split, "samples", None)
        if samples is not None:
            self.samples = [samples[i] for i in self.keep]

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> Any:
        return self.split[self.keep[index]]


def take(split: Any, keep: Tensor) -> Any:
    """The samples `keep` (int64 indices) of a split: in memory a smaller copy, else a view."""
    if isinstance(split, TensorImages):
        return TensorImages(split.x[keep], split.targets[keep])
    return Picked(split, keep.tolist())
