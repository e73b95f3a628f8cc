"""Fashion-MNIST pairs: a 100-class image task built from Fashion-MNIST, for
benchmarks/wire_classes100.py (what the sparse wire encodings cost in learning at C = 100).

An item is two Fashion-MNIST images side by side (1 x 28 x 56, uint8), the label 10 * left's
class + right's class: 100 ordered classes. Train pairs take both images from the training
split only, test pairs both from the test split only, so no test image is seen in training.
Which images pair up is drawn once from a fixed seed (`PAIRING_SEED`, torch's CPU generator,
independent of run.seed): every run and every seed of the benchmark sees the same pairs.

Why it is an honest 100-class image task for soft labels: its classes have the graded
similarity soft labels carry (a shirt and a T-shirt on the left, the same sneaker on the right,
are two classes a trained network confuses; a shirt and a bag are not), made of real images'
confusions, not of random prototypes. It is not a natural 100-class dataset (CIFAR-100 is not
on this machine): its similarity structure is a product of two 10-class ones.

Used as a `data.name: python` factory (the product's own path for a user's dataset):
    data: {name: python, factory: "benchmarks.fashion_pairs:build",
           options: {train_pairs: 20000, test_pairs: 5000}}
run from the repository root (the factory is imported as `benchmarks.fashion_pairs`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dml_cluster.data import load_dataset

PAIRING_SEED = 20261205
"""The seed of the pairing (fixed: not run.seed, so every seed trains on the same pairs)."""


class Pairs:
    """A split of pairs: images [N, 28, 28] uint8 and labels [N] of one Fashion-MNIST split,
    paired as `left`, `right` index the images ([P] each)."""

    def __init__(self, images: Tensor, labels: Tensor, left: Tensor, right: Tensor) -> None:
        self.images, self.left, self.right = images, left, right
        self.targets = 10 * labels[left] + labels[right]  # int64 [P]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        pair = torch.cat([self.images[self.left[index]], self.images[self.right[index]]], dim=1)
        return pair.unsqueeze(0), int(self.targets[index])


def _split(split: Any) -> tuple[Tensor, Tensor]:
    """A Fashion-MNIST split's images [N, 28, 28] uint8 and labels [N] (loader internals)."""
    return split.x[:, 0], split.targets


def pairing(n_images: int, n_pairs: int, stream: int) -> tuple[Tensor, Tensor]:
    """`n_pairs` (left, right) index pairs into `n_images` images, drawn uniformly with
    replacement from the fixed seed (`stream` keeps the train and test draws apart)."""
    g = torch.Generator().manual_seed(PAIRING_SEED + stream)
    return torch.randint(n_images, (n_pairs,), generator=g), torch.randint(
        n_images, (n_pairs,), generator=g
    )


def build(
    root: str | None, train_pairs: int = 20_000, test_pairs: int = 5_000
) -> tuple[Pairs, Pairs, int, list[str]]:
    """The python-factory contract (dml_cluster/data/factory.py): train and test pair splits,
    100 classes, their names ("left/right")."""
    fashion = load_dataset("fashion-mnist", root)
    names = fashion.class_names
    train_x, train_y = _split(fashion.train)
    test_x, test_y = _split(fashion.test)
    train = Pairs(train_x, train_y, *pairing(len(train_y), train_pairs, 0))
    test = Pairs(test_x, test_y, *pairing(len(test_y), test_pairs, 1))
    classes = [f"{a}/{b}" for a in names for b in names]
    return train, test, 100, classes
