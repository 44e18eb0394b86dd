"""Seeded, stratified selections of a dataset's training split.

`train_per_class` trains on a few images of every class (`--train-per-class`), and
`validation_split` holds some training images out for validation (`--val-split`). Both take an
`ImageDataset` and return a copy; the test split is never touched. The same seed picks the same
images, and the two draw from separate random streams.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import Dataset

from kd.data.datasets import ImageDataset, InMemorySplit, sample_names
from kd.errors import KDError

# A stream apart from `train_per_class`'s, so --train-per-class and --val-split pick independently.
_VAL_SEED_OFFSET = 0x5EED


def _train_labels(data: ImageDataset) -> torch.Tensor:
    return data.train.labels if isinstance(data.train, InMemorySplit) else torch.tensor(data.train.targets)


def _take(split: InMemorySplit | Dataset, index: torch.Tensor) -> InMemorySplit | Dataset:
    """The samples of `split` at `index` (in that order)."""
    if isinstance(split, InMemorySplit):
        names = sample_names(split)
        return InMemorySplit(split.images[index], split.labels[index], tuple(names[i] for i in index.tolist()))
    return split.subset(index.tolist())


def train_per_class(data: ImageDataset, per_class: int, seed: int) -> ImageDataset:
    """`data` with a seeded, stratified subset of `per_class` training images of every class (the test split whole).

    The same seed picks the same images; the picked indices keep the dataset's order.
    """
    if per_class < 1:
        raise KDError(f"--train-per-class must be a positive integer, got {per_class}")
    labels = _train_labels(data)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label, name in enumerate(data.class_names):
        members = torch.nonzero(labels == label).flatten()
        if len(members) < per_class:
            raise KDError(f"--train-per-class {per_class}: class {name!r} has only {len(members)} training images")
        picked.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    index = torch.cat(picked).sort().values
    note = f"note: training on {per_class} images per class ({len(index)} of {len(labels)}), picked with seed {seed}"
    return replace(data, train=_take(data.train, index), notes=(*data.notes, note))


def validation_split(data: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """`data` with a seeded, stratified validation split carved out of its training split.

    Every class gives round(fraction x its count) images (at least one) to `val` and keeps at
    least one for training; both splits keep the dataset's order. The test split is untouched.
    """
    if not 0.0 < fraction < 1.0:
        raise KDError(f"--val-split must be a fraction between 0 and 1 (exclusive), got {fraction}")
    labels = _train_labels(data)
    generator = torch.Generator().manual_seed(seed + _VAL_SEED_OFFSET)
    val_parts, train_parts = [], []
    for label, name in enumerate(data.class_names):
        members = torch.nonzero(labels == label).flatten()
        count = max(1, round(fraction * len(members)))
        if count >= len(members):
            raise KDError(
                f"--val-split {fraction}: class {name!r} has {len(members)} training image(s), too few to "
                "keep one for training and give one to validation"
            )
        shuffled = members[torch.randperm(len(members), generator=generator)]
        val_parts.append(shuffled[:count])
        train_parts.append(shuffled[count:])
    val_index, train_index = torch.cat(val_parts).sort().values, torch.cat(train_parts).sort().values
    note = f"note: validating on {len(val_index)} of {len(labels)} training images (--val-split {fraction}, seed {seed})"
    return replace(data, train=_take(data.train, train_index), val=_take(data.train, val_index), notes=(*data.notes, note))
