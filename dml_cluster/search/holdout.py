"""The proxy task's data, as a `data.name: python` factory: the training subset the candidates
train on, and as its "test" split the validation split -- training images the subset left out.

A round's cohort therefore trains and evaluates with the project's own data path and never
reads the test set: the accuracy its summary reports is the validation accuracy the reward uses.
"""

from __future__ import annotations

from typing import Any

import torch

from dml_cluster.data import load_dataset
from dml_cluster.data.dataset import take, targets
from dml_cluster.data.seeding import seeded_generator
from dml_cluster.data.split import subset_indices
from dml_cluster.errors import DataError

FACTORY = "dml_cluster.search.holdout:holdout"


def holdout(
    root: str | None,
    *,
    dataset: str,
    dataset_options: dict[str, Any] | None = None,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    validation_per_class: int | None = None,
) -> tuple[Any, Any, int, tuple[str, ...]]:
    """(train subset, validation split, classes, class names) of `dataset`'s training set.

    The subset is `data.train_subset`'s (`per_class` or `fraction` of each class, `seed`); the
    validation split is the rest, at most `validation_per_class` of each class (seeded).
    """
    data = load_dataset(dataset, root, **(dataset_options or {}))
    labels = targets(data.train)
    keep = subset_indices(labels, seed, per_class=per_class, fraction=fraction)
    left = torch.ones(len(labels), dtype=torch.bool)
    left[keep] = False
    held = torch.nonzero(left).flatten()
    if validation_per_class is not None:
        g = seeded_generator("search_validation", seed)
        chosen = [
            members[torch.randperm(len(members), generator=g)[:validation_per_class]]
            for members in (held[labels[held] == c] for c in torch.unique(labels[held]).tolist())
        ]
        held = torch.sort(torch.cat(chosen)).values
    if len(held) == 0:
        raise DataError(
            "search: the training subset keeps every training image, so no validation split "
            "is left (use a fraction below 1 or fewer per class)"
        )
    return take(data.train, keep), take(data.train, held), data.num_classes, data.class_names
