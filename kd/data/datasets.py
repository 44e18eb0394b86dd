"""One data layer for every dataset: a name (and a directory) in, class names and images out.

`load_dataset` returns an `ImageDataset`: the class names, the image geometry, the
normalisation statistics, the augmentations the data gets unless the user chooses others
(`kd.data.augment.default_augment`), and the two splits. A split
is either an `InMemorySplit` (every image decoded once into one uint8 N x C x H x W tensor,
for small images) or a streaming `torch.utils.data.Dataset` that yields
(uint8 C x S x S tensor, int label) pairs (for large ImageFolder trees). Batching, sharding,
on-device augmentation and normalisation are `kd.data.loader`'s business, not this module's.

Datasets (reading an ImageFolder tree is `kd.data.imagefolder`'s; the training subsets of
`--train-per-class` and `--val-split` are `kd.data.splits`'):

* ``digits``: scikit-learn's bundled 8x8 digits (no directory, no download).
* ``cifar10``, ``cifar100``, ``mnist``, ``fashionmnist``, ``svhn``: torchvision's classes over
  ``data_dir``; nothing is downloaded unless ``download=True``.
* ``imagefolder``: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (or ``val/``).

Every problem a user can fix is raised as a one-line `KDError`: an unreadable folder or image
file is named in it (or, with ``skip_bad_images=True``, the image is left out and counted).
ImageFolder geometry (side, gray or RGB) comes from the headers of many training images, not
from the first one; hidden folders (``.ipynb_checkpoints``) are not classes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kd.data.augment import default_augment
from kd.data.decode import open_image
from kd.data.imagefolder import FolderData, imagefolder_class_names, read_imagefolder
from kd.errors import KDError, one_line

DATASET_NAMES = ("digits", "cifar10", "cifar100", "mnist", "fashionmnist", "svhn", "imagefolder")

# The normalisation of colour images whose statistics are not computed here (streamed ImageFolder
# data), and of pretrained ImageNet classifiers without their own (`kd.models.pretrained`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.25,)

# name -> (torchvision class, display name)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "CIFAR-10"),
    "cifar100": ("CIFAR100", "CIFAR-100"),
    "mnist": ("MNIST", "MNIST"),
    "fashionmnist": ("FashionMNIST", "Fashion-MNIST"),
    "svhn": ("SVHN", "SVHN"),
}


@dataclass
class InMemorySplit:
    """A whole split decoded once: uint8 images (N x C x H x W, contiguous) and int64 labels (N).

    `names` name the samples (see `sample_names`); None means their positions, "0".."N-1".
    """

    images: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 of length {self.images.shape[0]}, got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.names is not None and len(self.names) != len(self.labels):
            raise ValueError(f"{len(self.names)} sample names for {len(self.labels)} samples")
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ImageDataset:
    """A dataset and the description its consumers need (see the module docstring)."""

    name: str
    class_names: list[str]
    channels: int
    image_size: int
    train: InMemorySplit | Dataset
    test: InMemorySplit | Dataset
    in_memory: bool
    default_augment: tuple[str, ...]  # the training augmentations unless the user chooses (kd.data.augment names)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped_images: int = 0  # unreadable image files left out (`skip_bad_images=True`)
    notes: tuple[str, ...] = ()  # one-line notes for the user (mixed image sizes or modes, skipped files)
    val: InMemorySplit | Dataset | None = None  # carved out of train by `kd.data.splits.validation_split`

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        where = "in memory" if self.in_memory else "streaming"
        return (
            f"{self.name}: {self.num_classes} classes, {len(self.train)} train / "
            + (f"{len(self.val)} val / " if self.val is not None else "")
            + f"{len(self.test)} test, "
            f"{self.channels}x{self.image_size}x{self.image_size}, {where}"
            + (f", {self.skipped_images} unreadable images skipped" if self.skipped_images else "")
        )


def sample_names(split: InMemorySplit | Dataset) -> list[str]:
    """What names each sample of a split, in order, so a file about samples (stored soft labels) can find them.

    An ImageFolder image is named by its path relative to its split's folder ("cat/0001.jpg");
    a sample of a built-in dataset by its position in the dataset's split ("0".."N-1"). The
    selections of `kd.data.splits` keep the names of the samples they keep.
    """
    if isinstance(split, InMemorySplit):
        return list(split.names) if split.names is not None else [str(i) for i in range(len(split))]
    root = str(split.root)
    return [os.path.relpath(path, root).replace(os.sep, "/") for path, _ in split.samples]


def load_dataset(
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    max_in_memory_bytes: int = 4 * 2**30,
    skip_bad_images: bool = False,
) -> ImageDataset:
    """Load dataset `name` (one of `DATASET_NAMES`) from `data_dir`.

    `image_size` (optional) is the square side the model sees: ImageFolder images are decoded
    or cropped to it; the fixed-size datasets are resized to it in memory when it differs from
    their native size. Without it, an ImageFolder's side is the longer side of the most common
    image size among a few hundred training images spread over the classes; the dataset is RGB
    if any of them is colour. ImageFolder data is held in memory when that side is at most 64
    and all of it fits in `max_in_memory_bytes`; otherwise it is streamed from disk.

    An unreadable ImageFolder image is a one-line KDError naming it; with `skip_bad_images` it
    is left out instead, and counted in `ImageDataset.skipped_images`. Mixed sizes or modes and
    skipped files are described in `ImageDataset.notes`, one line each, for the caller to print.
    """
    key = dataset_key(name)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise KDError(f"image size must be a positive whole number of pixels, got {image_size!r}")
    if key == "imagefolder":
        return _load_imagefolder(data_dir, image_size, max_in_memory_bytes, skip_bad_images)
    dataset = _load_digits() if key == "digits" else _load_torchvision(key, data_dir, download)
    if image_size is not None and image_size != dataset.image_size:
        dataset = _resize_in_memory(dataset, image_size, max_in_memory_bytes)
    return dataset


# ----------------------------------------------------------------------------- helpers


def normalise_dataset_name(name: str) -> str:
    """A dataset name as `DATASET_NAMES` lists it: case, spaces, "-" and "_" ignored ("Fashion-MNIST")."""
    return "".join(str(name).strip().lower().replace("-", "").replace("_", "").split())


def dataset_key(name: str) -> str:
    """The `DATASET_NAMES` entry `name` means; a one-line KDError for an unknown dataset."""
    key = normalise_dataset_name(name)
    if key not in DATASET_NAMES:
        raise KDError(f"unknown dataset {str(name)!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return key


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] pixel units, in float64."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = float((counts * levels).sum() / total)
        var = float((counts * (levels - mean) ** 2).sum() / total)
        std = math.sqrt(var)
        means.append(mean)
        stds.append(std if std > 1e-6 else 1.0)  # a constant channel: normalise by 1, not 0
    return tuple(means), tuple(stds)


def _in_memory_dataset(
    name: str, class_names: list[str], train: InMemorySplit, test: InMemorySplit, augment: tuple[str, ...]
) -> ImageDataset:
    mean, std = _channel_stats(train.images)
    return ImageDataset(
        name=name,
        class_names=class_names,
        channels=int(train.images.shape[1]),
        image_size=int(train.images.shape[-1]),
        train=train,
        test=test,
        in_memory=True,
        default_augment=augment,
        mean=mean,
        std=std,
    )


def _resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        out[start : start + chunk] = TF.resize(images[start : start + chunk], [size, size], antialias=True)
    return out


def _resize_in_memory(dataset: ImageDataset, size: int, max_bytes: int) -> ImageDataset:
    """A fixed-size dataset resized (bilinear, antialiased) to size x size, held in memory."""
    assert isinstance(dataset.train, InMemorySplit) and isinstance(dataset.test, InMemorySplit)
    total = (len(dataset.train) + len(dataset.test)) * dataset.channels * size * size
    if total > max_bytes:
        raise KDError(
            f"{dataset.name} resized to {size}x{size} needs {total / 2**30:.1f} GiB in memory, over the "
            f"{max_bytes / 2**30:.1f} GiB limit; use a smaller --image-size"
        )
    train = InMemorySplit(_resize_images(dataset.train.images, size), dataset.train.labels, dataset.train.names)
    test = InMemorySplit(_resize_images(dataset.test.images, size), dataset.test.labels, dataset.test.names)
    return _in_memory_dataset(dataset.name, dataset.class_names, train, test, dataset.default_augment)


# ----------------------------------------------------------------------------- digits


def _load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(np.rint(digits.images * 255.0 / 16.0), 0, 255).astype(np.uint8)[:, None]  # N,1,8,8
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    train = InMemorySplit(images_t[train_idx].contiguous(), labels_t[train_idx].contiguous())
    test = InMemorySplit(images_t[test_idx].contiguous(), labels_t[test_idx].contiguous())
    return _in_memory_dataset("digits", [str(d) for d in range(10)], train, test, default_augment("digits"))


# ----------------------------------------------------------------------------- torchvision datasets


def _load_torchvision(key: str, data_dir: str | os.PathLike | None, download: bool) -> ImageDataset:
    import torchvision.datasets

    class_name, display = _TORCHVISION[key]
    if data_dir is None:
        raise KDError(f"{key} needs --data-dir DIR: where the {display} data is, or where --download should put it")
    root = os.path.expanduser(os.fspath(data_dir))
    if os.path.exists(root) and not os.path.isdir(root):
        raise KDError(f"--data-dir is not a directory: {root}")
    cls = getattr(torchvision.datasets, class_name)

    def open_split(train: bool) -> Any:
        kwargs = {"split": "train" if train else "test"} if key == "svhn" else {"train": train}
        try:
            return cls(root=root, download=download, **kwargs)
        except (RuntimeError, OSError, EOFError, ValueError) as error:
            if download:
                raise KDError(f"could not download {display} into {root}: {one_line(error, 300)}") from None
            if isinstance(error, RuntimeError):
                raise KDError(
                    f"no {display} data under {root}; pass --download to fetch it, or point --data-dir at it"
                ) from None
            raise KDError(f"cannot read the {display} data under {root}: {one_line(error, 300)}") from None

    splits = []
    for train in (True, False):
        source = open_split(train)
        data = source.data
        images = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
        if images.ndim == 3:  # MNIST, FashionMNIST: N x H x W
            images = images.unsqueeze(1)
        elif key in ("cifar10", "cifar100"):  # N x H x W x C
            images = images.permute(0, 3, 1, 2)
        labels = source.labels if key == "svhn" else source.targets
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        splits.append(InMemorySplit(images.to(torch.uint8).contiguous(), labels.contiguous()))
        if train:
            class_names = [str(d) for d in range(10)] if key == "svhn" else [str(c) for c in source.classes]
    return _in_memory_dataset(key, class_names, splits[0], splits[1], default_augment(key))


# ----------------------------------------------------------------------------- imagefolder


def _load_imagefolder(
    data_dir: str | os.PathLike | None, image_size: int | None, max_bytes: int, skip_bad_images: bool = False
) -> ImageDataset:
    folder = read_imagefolder(data_dir, image_size, max_bytes, skip_bad_images)
    if folder.decoded is not None:
        train, test = (
            InMemorySplit(images, labels, tuple(os.path.relpath(path, split_dir).replace(os.sep, "/") for path, _ in samples))
            for (images, labels), (split_dir, samples) in zip(folder.decoded.values(), folder.splits.values())
        )
        dataset = _in_memory_dataset(folder.name, folder.class_names, train, test, default_augment("imagefolder"))
    else:
        dataset = _streaming_dataset(folder, skip_bad_images)
    dataset.skipped_images, dataset.notes = folder.skipped, folder.notes
    return dataset


def _streaming_dataset(folder: FolderData, skip_bad: bool) -> ImageDataset:
    # Here, not at the top: torchvision (and kd.data.streaming, which subclasses its ImageFolder)
    # costs seconds to import that in-memory data never needs.
    from torchvision import transforms as T

    from kd.data.streaming import StreamingImageFolder

    channels, size = folder.channels, folder.size
    loader = partial(open_image, channels=channels)
    # Both splits: the evaluation view (resize to size / 0.875, centre crop). Training with the
    # crop augmentation swaps in `kd.data.augment.StreamingResizedCrop` (see `kd.data.loader`).
    view = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.PILToTensor()])
    train, test = (
        StreamingImageFolder(split_dir, folder.class_names, samples, view, loader, skip_bad)
        for split_dir, samples in folder.splits.values()
    )
    return ImageDataset(
        name=folder.name,
        class_names=folder.class_names,
        channels=channels,
        image_size=size,
        train=train,
        test=test,
        in_memory=False,
        default_augment=default_augment("imagefolder"),
        mean=IMAGENET_MEAN if channels == 3 else GRAY_MEAN,
        std=IMAGENET_STD if channels == 3 else GRAY_STD,
    )


def dataset_class_names(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The class names of dataset `name`, in label order, without decoding ImageFolder images.

    digits: "0".."9"; imagefolder: the sorted class folders of ``data_dir/train``; the
    torchvision datasets are opened with `load_dataset` (their names live in the data files).
    """
    key = dataset_key(name)
    if key == "digits":
        return [str(d) for d in range(10)]
    if key != "imagefolder":
        return list(load_dataset(key, data_dir).class_names)
    return imagefolder_class_names(data_dir)
