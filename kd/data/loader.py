"""Batches for the training engine: sharded per process, augmented and normalised on the device.

One path for every dataset. Each process gets its own slice of every epoch (`shard_indices`).
In-memory data (a uint8 tensor, see `kd.data.datasets.InMemorySplit`) is moved to the device once
and batches are cut and augmented there (`kd.data.augment`: the user's list, or the dataset's
default), instead of PIL work per sample per epoch. Streaming data (large ImageFolder trees)
goes through a DataLoader with workers over the same shard, decoding and resizing on the CPU
(with ``crop`` listed, making the seeded random-resized crop there); the other augmentations
and normalisation still run on the device. A worker's `KDError` (an unreadable image) reaches
the caller as the worker's one line.
"""

from __future__ import annotations

import math
import os
import traceback
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kd.data.augment import AugmentOptions, StreamingResizedCrop, build_pipeline
from kd.data.datasets import ImageDataset, InMemorySplit
from kd.errors import KDError

# Offsets the host generator's seed from the device generator's (on a GPU, where they differ).
_HOST_SEED = 0x5EED_0057


def shard_indices(
    num_samples: int,
    *,
    rank: int,
    world_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's sample indices for one epoch, and which of them are real (not padding).

    Every process gets the same count: the epoch's order (a permutation seeded by seed and
    epoch, identical on all processes) is padded by wrapping around to a multiple of the world
    size, then dealt out round-robin. Padding entries are marked invalid so evaluation can
    drop them after gathering.
    """
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_samples, generator=generator)
    else:
        order = torch.arange(num_samples)
    per_rank = math.ceil(num_samples / world_size)
    padded_total = per_rank * world_size
    valid = torch.arange(padded_total) < num_samples
    order = order.repeat(math.ceil(padded_total / max(num_samples, 1)))[:padded_total]
    return order[rank::world_size], valid[rank::world_size]


def worker_error(error: KDError) -> KDError:
    """The one-line KDError a DataLoader worker raised, from the copy the main process re-raises.

    DataLoader re-raises a worker's exception as the same type whose message is a header, the
    worker's traceback and, last, `kd.errors.KDError: <the message>`; keep only that message.
    """
    text = str(error).strip()
    if "\n" in text:
        last = text.splitlines()[-1]
        name = f"{type(error).__module__}.{type(error).__qualname__}: "
        text = last[len(name):] if last.startswith(name) else last
    return KDError(" ".join(text.split())[:300])


class Normalize:
    """uint8 batch -> float batch, (x / 255 - mean) / std per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale - self.shift


class _EpochSamples(Dataset):
    """A streamed split read by (sample index, epoch): the epoch picks the training crop's draws.

    Keyed by epoch, one DataLoader (and, in training, its persistent workers) serves every epoch: the sampler
    says which samples of which epoch to read, and each worker makes the epoch's crop when it
    first sees that epoch.
    """

    def __init__(self, source: Dataset, crop_size: int | None, seed: int) -> None:
        self.source, self.crop_size, self.seed = source, crop_size, seed
        self._epoch: int | None = None
        self._cropped: Dataset = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        if self.crop_size is None:
            return self.source[index]
        if epoch != self._epoch:
            self._epoch = epoch
            self._cropped = self.source.with_transform(StreamingResizedCrop(self.crop_size, self.seed, epoch))
        return self._cropped[index]


class _EpochOrder(Sampler):
    """The (sample index, epoch) keys of the batches to read next; set before each pass."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class DeviceBatches:
    """Iterable over (normalised float images, targets, valid mask, sample indices) batches on `device`.

    The sample indices are the batch's positions in the split (stored soft labels are looked up by them).

    `training=True` (the default for the train split): shuffled each epoch (call
    `set_epoch`), augmented by `augment` (None: the dataset's `default_augment` with default
    parameters), incomplete last batch dropped; targets are (N,) class indices, or (N, K)
    float32 label distributions when Mixup or CutMix is listed. All augmentation randomness
    comes from `self.generator` (save its state to resume bitwise). `training=False` (the
    default for the test split; also for a pass over the train split, e.g. to estimate a
    C-matrix): fixed order, no augmentation, class-index targets, every sample exactly once
    across the processes (padding is flagged invalid in the mask).
    """

    def __init__(
        self,
        data: ImageDataset,
        split: str,
        batch_size: int,
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int | None = None,
        training: bool | None = None,
        augment: AugmentOptions | None = None,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if split == "val" and data.val is None:
            raise ValueError("the dataset has no validation split (see kd.data.splits.validation_split)")
        self.train = split == "train" if training is None else training
        self.source = {"train": data.train, "val": data.val, "test": data.test}[split]
        self.batch_size = batch_size
        self.device = device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.start_batch, self.stop_batch = 0, None  # the epoch's batch range (see set_epoch)
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.normalize = Normalize(data.mean, data.std, device)
        self.generator = torch.Generator(device=device).manual_seed(seed * 7919 + rank)
        # Host-side draws (see `build_pipeline`): the same generator on the CPU, its own on a GPU.
        self.host_generator = (
            self.generator if self.generator.device.type == "cpu" else torch.Generator().manual_seed(seed * 7919 + rank + _HOST_SEED)
        )
        self.image_size = data.image_size
        self.augment_options = (augment or AugmentOptions(data.default_augment)) if self.train else None
        self.augment = (
            build_pipeline(
                self.augment_options, image_size=data.image_size, num_classes=data.num_classes,
                normalize=self.normalize, generator=self.generator, host_generator=self.host_generator,
                streaming=not isinstance(self.source, InMemorySplit),
            )
            if self.augment_options is not None
            else None
        )
        if isinstance(self.source, InMemorySplit):
            self._images = self.source.images.to(device)
            self._labels = self.source.labels.to(device)
        self.num_samples = len(self.source.labels) if isinstance(self.source, InMemorySplit) else len(self.source)
        self._order, self._loader = _EpochOrder(), None  # streamed data: one DataLoader for every pass

    def close(self) -> None:
        """Stop the DataLoader workers of streamed data (they are started again if iterated)."""
        self._loader = None

    def set_epoch(self, epoch: int, start_batch: int = 0, stop_batch: int | None = None) -> None:
        """Select the epoch (its shuffle) and which of its batches to yield: [start_batch, stop_batch).

        The index list is sliced before any augmentation, so skipping the batches a resumed
        run has already trained on consumes no augmentation randomness.
        """
        self.epoch = epoch
        self.start_batch, self.stop_batch = start_batch, stop_batch

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return shard_indices(
            self.num_samples,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.train,
            seed=self.seed,
            epoch=self.epoch,
        )

    def __len__(self) -> int:
        per_rank = math.ceil(self.num_samples / self.world_size)
        if self.train:
            return max(per_rank // self.batch_size, 1)
        return math.ceil(per_rank / self.batch_size)

    def _uint8_batches(self, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.source, InMemorySplit):
            indices = indices.to(self.device)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                yield self._images[chunk], self._labels[chunk]
            return
        if self._loader is None:
            crops = self.augment_options is not None and "crop" in self.augment_options.names
            self._loader = DataLoader(
                _EpochSamples(self.source, self.image_size if crops else None, self.seed),
                batch_size=self.batch_size,
                sampler=self._order,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                # Training: the workers start once and serve every epoch (`close` stops them).
                persistent_workers=self.num_workers > 0 and self.train,
            )
        self._order.keys = [(index, self.epoch) for index in indices.tolist()]
        batches = iter(self._loader)
        while True:
            try:
                images, labels = next(batches)
            except StopIteration:
                return
            except KDError as error:  # raised in a worker: its traceback is in the message
                failure = worker_error(error)
                traceback.clear_frames(error.__traceback__)  # they hold `batches` in a reference cycle
                break
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        del batches
        self._loader = None  # stops its workers now, not whenever a garbage collection gets to them
        raise failure

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        indices, valid = self._indices()
        if self.train:
            # Whole batches only (a batch of 1 breaks BatchNorm); the epoch's shuffle moves the
            # dropped remainder around.
            usable = len(self) * self.batch_size if len(indices) >= self.batch_size else len(indices)
            indices, valid = indices[:usable], valid[:usable]
        first = self.start_batch * self.batch_size
        last = None if self.stop_batch is None else self.stop_batch * self.batch_size
        indices, valid = indices[first:last], valid[first:last]
        valid, positions = valid.to(self.device), indices.to(self.device)
        for batch_number, (images, labels) in enumerate(self._uint8_batches(indices)):
            start = batch_number * self.batch_size
            targets = labels
            if self.augment is not None:
                images, targets = self.augment(images, labels)
            else:
                images = self.normalize(images)
            yield images, targets, valid[start : start + len(labels)], positions[start : start + len(labels)]
