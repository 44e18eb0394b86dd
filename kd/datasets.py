"""One data layer for every dataset: a name (and a directory) in, class names and images out.

`load_dataset` returns an `ImageDataset`: the class names, the image geometry, the
normalisation statistics, the augmentations the data gets unless the user chooses others
(`kd.augment.default_augment`), and the two splits. A split
is either an `InMemorySplit` (every image decoded once into one uint8 N x C x H x W tensor,
for small images) or a streaming `torch.utils.data.Dataset` that yields
(uint8 C x S x S tensor, int label) pairs (for large ImageFolder trees). Batching, sharding,
on-device augmentation and normalisation are `kd.loader`'s business, not this module's.

Datasets:

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
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kd import datacache
from kd.augment import default_augment
from kd.errors import KDError, one_line, short_list

DATASET_NAMES = ("digits", "cifar10", "cifar100", "mnist", "fashionmnist", "svhn", "imagefolder")

# File endings an ImageFolder tree may hold (torchvision's IMG_EXTENSIONS), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Formats torchvision.io decodes natively (fast path); the rest go through PIL.
_FAST_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# PIL modes that make a one-channel dataset; every other mode is converted to RGB.
_GRAY_MODES = frozenset({"L", "LA", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.25,)

# In-memory ImageFolder data: at most this many pixels per side ...
MAX_IN_MEMORY_SIDE = 64
# ... and decoding happens in chunks of about this many bytes per worker round trip.
_CHUNK_BYTES = 2 * 2**20
_MIN_CHUNK = 64
_MAX_CHUNK = 1024
# The image geometry is decided from the headers of this many training images (all, if fewer).
_PROBE_FILES = 512

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
    """A whole split decoded once: uint8 images (N x C x H x W, contiguous) and int64 labels (N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 of length {self.images.shape[0]}, got {self.labels.dtype} {tuple(self.labels.shape)}")
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
    default_augment: tuple[str, ...]  # the training augmentations unless the user chooses (kd.augment names)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped_images: int = 0  # unreadable image files left out (`skip_bad_images=True`)
    notes: tuple[str, ...] = ()  # one-line notes for the user (mixed image sizes or modes, skipped files)
    val: InMemorySplit | Dataset | None = None  # carved out of train by `validation_split`

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
    train = InMemorySplit(_resize_images(dataset.train.images, size), dataset.train.labels)
    test = InMemorySplit(_resize_images(dataset.test.images, size), dataset.test.labels)
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


def is_image_file(path: str) -> bool:
    """An ImageFolder sample: a known image ending, not a hidden file (e.g. macOS `._x.jpg`)."""
    base = os.path.basename(path)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _folder_error(what: str, folder: str | os.PathLike, error: OSError) -> KDError:
    return KDError(f"cannot read {what} {folder}: {error.strerror or one_line(error, 300)}")


def _scan(folder: Path, what: str) -> list[os.DirEntry]:
    """The entries of `folder`; a one-line KDError naming it when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise _folder_error(what, folder, error) from None


def _class_folders(split_dir: Path) -> list[str]:
    """The sorted class folders of a split. Hidden folders (`.ipynb_checkpoints`, `.git`) are no classes."""
    names = sorted(
        entry.name for entry in _scan(split_dir, "folder") if entry.is_dir() and not entry.name.startswith(".")
    )
    if not names:
        raise KDError(f"no class folders in {split_dir}; expected {split_dir}{os.sep}<class>{os.sep}<image files>")
    return names


def _list_images(split_dir: Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) pairs in torchvision ImageFolder's order: classes sorted, then files sorted."""
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(class_names):
        folder = os.path.join(split_dir, name)

        def unreadable(error: OSError, folder: str = folder) -> None:
            where = error.filename or folder
            raise _folder_error("class folder" if where == folder else "folder", where, error)

        found = 0
        for dirpath, _, filenames in sorted(os.walk(folder, onerror=unreadable, followlinks=True)):
            for filename in sorted(filenames):
                path = os.path.join(dirpath, filename)
                if is_image_file(path):
                    samples.append((path, label))
                    found += 1
        if found == 0:
            raise KDError(f"no images in class folder {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return samples


def _image_error(path: str, error: BaseException) -> KDError:
    """`cannot read image PATH: REASON`, one line of at most 300 characters (a KDError passes as is)."""
    from PIL import UnidentifiedImageError

    if isinstance(error, KDError):
        return error
    if isinstance(error, UnidentifiedImageError):
        reason = "not an image file PIL can identify (corrupt or unsupported)"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = one_line(error, 300)
    shown = path if len(path) <= 200 else "..." + path[-197:]
    return KDError(one_line(f"cannot read image {shown}: {reason}", 300))


def _to_mode(image: Any, channels: int) -> Any:
    """A PIL image as 'L' (channels 1) or 'RGB' (channels 3); 16-bit gray is scaled to 8 bits."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _pil_open(path: str, channels: int) -> Any:
    """Open and fully decode `path` with PIL, in the dataset's mode; a one-line KDError if it cannot."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return _to_mode(image, channels)
    except Exception as error:  # PIL raises many types for bad files
        raise _image_error(path, error) from None


def _streaming_loader(path: str, channels: int = 3) -> Any:
    return _pil_open(path, channels)


def _probe(path: str) -> tuple[str, int, int]:
    """PIL mode, width and height of an image, from its header (the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode, image.size[0], image.size[1]
    except Exception as error:
        raise _image_error(path, error) from None


def _spread(samples: Sequence[tuple[str, int]], limit: int) -> list[int]:
    """Indices of all samples, or when there are more than `limit`, of about `limit` of them,
    evenly spaced within every class (at least one per class). Deterministic."""
    if len(samples) <= limit:
        return list(range(len(samples)))
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(index)
    quota = max(1, limit // len(by_class))
    picked: list[int] = []
    for indices in by_class.values():
        count = min(quota, len(indices))
        picked.extend(indices[i * len(indices) // count] for i in range(count))
    return picked


def _decide_geometry(
    headers: Sequence[tuple[str, int, int]], image_size: int | None, total: int
) -> tuple[int, int, str]:
    """(channels, side, note) for a dataset from the (mode, width, height) of `headers`, read from
    that many of its `total` training images.

    The side is the longer side of the most common size (or `image_size`); the dataset is RGB if
    any image is colour. The note is one line when sizes or modes are mixed, else empty.
    """
    sizes = Counter((width, height) for _, width, height in headers)
    (width, height), common = sizes.most_common(1)[0]
    side = image_size if image_size is not None else max(width, height)
    gray = sum(mode in _GRAY_MODES for mode, _, _ in headers)
    mixed = []
    if len(sizes) > 1:
        mixed.append(
            f"{len(sizes)} sizes, most common {width}x{height} ({common} images); all are resized to {side}x{side}"
        )
    if 0 < gray < len(headers):
        mixed.append(f"{gray} grayscale and {len(headers) - gray} colour; grayscale ones are converted to RGB")
    probed = f"all {total}" if len(headers) >= total else f"{len(headers)} of {total}, spread over the classes"
    note = one_line(f"note: mixed training images ({probed} probed): " + "; ".join(mixed), 300) if mixed else ""
    return (1 if gray == len(headers) else 3), side, note


def _decode_one(path: str, channels: int, size: int) -> torch.Tensor:
    """One image as a uint8 channels x size x size tensor: torchvision.io for JPEG/PNG/WebP, else PIL."""
    image = None
    if path.lower().endswith(_FAST_EXTENSIONS):
        try:
            from torchvision.io import ImageReadMode, decode_image

            data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
            mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
            image = decode_image(data, mode=mode)
            if image.ndim == 4:  # animated image: first frame
                image = image[0]
            if image.dtype != torch.uint8 or image.shape[0] != channels:
                image = None  # 16-bit PNG or an odd mode: let PIL (and `_to_mode`) handle it
        except (RuntimeError, ImportError, ValueError, OSError):
            image = None  # unsupported, corrupt or unreadable: PIL decides (and names the error)
    if image is None:
        array = np.asarray(_pil_open(path, channels))
        image = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)
    if image.shape[-2:] != (size, size):
        from torchvision.transforms.v2 import functional as TF

        image = TF.resize(image.unsqueeze(0), [size, size], antialias=True)[0]
    return image


class _FileChunks(Dataset):
    """Item i = (start, result for files[start:start+chunk], failures), made in a worker process.

    A failure is (index into files, one-line message); the chunk's other files are still done.
    Subclasses say what a chunk's result is (`_new`) and how one file goes into it (`_one`).
    """

    def __init__(self, files: list[str], chunk: int) -> None:
        self.files, self.chunk = files, max(1, chunk)

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.chunk)

    def _new(self, count: int) -> Any:
        raise NotImplementedError

    def _one(self, result: Any, offset: int, path: str) -> None:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[int, Any, list[tuple[int, str]]]:
        start = index * self.chunk
        paths = self.files[start : start + self.chunk]
        result = self._new(len(paths))
        failures = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision >= 0.29 deprecates its decoders; PIL's noise
            for offset, path in enumerate(paths):
                try:
                    self._one(result, offset, path)
                except Exception as error:  # reported, with the file's name, by the main process
                    failures.append((start + offset, str(_image_error(path, error))))
        return start, result, failures


class _DecodeChunks(_FileChunks):
    """A chunk's result: its images decoded into one uint8 tensor."""

    def __init__(self, files: list[str], channels: int, size: int, chunk: int) -> None:
        super().__init__(files, chunk)
        self.channels, self.size = channels, size

    def _new(self, count: int) -> torch.Tensor:
        return torch.empty((count, self.channels, self.size, self.size), dtype=torch.uint8)

    def _one(self, result: torch.Tensor, offset: int, path: str) -> None:
        result[offset] = _decode_one(path, self.channels, self.size)


class _HeaderChunks(_FileChunks):
    """A chunk's result: the (mode, width, height) header of each file, None where unreadable."""

    def _new(self, count: int) -> list[tuple[str, int, int] | None]:
        return [None] * count

    def _one(self, result: list, offset: int, path: str) -> None:
        result[offset] = _probe(path)


def _identity(item: Any) -> Any:
    return item


def _run_chunks(
    chunks: _FileChunks, desc: str, skip_bad: bool, take: Callable[[int, Any], None]
) -> list[tuple[int, str]]:
    """Work through `chunks` with DataLoader worker processes, handing each chunk's result to
    `take(start, result)`. Returns the failures; without `skip_bad` the first is raised as a KDError."""
    from tqdm import tqdm

    workers = min(4, os.cpu_count() or 1, len(chunks)) if len(chunks) > 1 else 0
    loader = DataLoader(chunks, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity)
    failures: list[tuple[int, str]] = []
    with tqdm(total=len(chunks.files), desc=desc, leave=False, file=sys.stderr, unit="img", disable=None) as progress:
        for start, result, bad in loader:
            if bad and not skip_bad:
                raise KDError(bad[0][1])
            failures.extend(bad)
            take(start, result)
            progress.update(len(result))
    return failures


def _decode_cached(
    files: list[str], channels: int, size: int, desc: str, skip_bad: bool = False
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """`_decode_all` through the decoded-data cache (`kd.datacache`): only a clean decode is cached."""
    key = datacache.cache_key(files, channels, size)
    images = datacache.load_decoded(key, (len(files), channels, size, size))
    if images is not None:
        return images, []
    images, failures = _decode_all(files, channels, size, desc, skip_bad)
    if not failures:
        datacache.store_decoded(key, images)
    return images, failures


def _decode_all(
    files: list[str], channels: int, size: int, desc: str, skip_bad: bool = False
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """Decode `files` into one uint8 N x C x size x size tensor with DataLoader worker processes.

    Returns the tensor and the failures (index, message), whose rows are left undefined; without
    `skip_bad` the first failure is raised as a KDError instead.
    """
    out = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    chunk = max(_MIN_CHUNK, min(_MAX_CHUNK, _CHUNK_BYTES // (channels * size * size)))

    def take(start: int, images: torch.Tensor) -> None:
        out[start : start + images.shape[0]] = images

    failures = _run_chunks(_DecodeChunks(files, channels, size, chunk), desc, skip_bad, take)
    return out, failures


def _read_headers(
    files: list[str], desc: str, skip_bad: bool = False, workers: bool = True
) -> tuple[list[tuple[str, int, int] | None], list[tuple[int, str]]]:
    """The (mode, width, height) header of every file (None where unreadable) and the failures.

    Without `skip_bad` the first failure is raised as a KDError. `workers=False` reads them in this
    process (for a small probe, where starting workers would cost more than it saves).
    """
    headers: list[tuple[str, int, int] | None] = [None] * len(files)

    def take(start: int, result: list) -> None:
        headers[start : start + len(result)] = result

    chunk = _MAX_CHUNK if workers else len(files)
    return headers, _run_chunks(_HeaderChunks(files, chunk), desc, skip_bad, take)


def _train_labels(data: ImageDataset) -> torch.Tensor:
    return data.train.labels if isinstance(data.train, InMemorySplit) else torch.tensor(data.train.targets)


def _take(split: InMemorySplit | Dataset, index: torch.Tensor) -> InMemorySplit | Dataset:
    """The samples of `split` at `index` (in that order)."""
    if isinstance(split, InMemorySplit):
        return InMemorySplit(split.images[index], split.labels[index])
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


# A stream apart from `train_per_class`'s, so --train-per-class and --val-split pick independently.
_VAL_SEED_OFFSET = 0x5EED


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


def _drop_failures(
    samples: list[tuple[str, int]], failures: Sequence[tuple[int, str]], split_dir: Path
) -> list[tuple[str, int]]:
    """`samples` less the failed ones; a KDError when none is left."""
    bad = {index for index, _ in failures}
    kept = [sample for index, sample in enumerate(samples) if index not in bad]
    if not kept:
        raise KDError(one_line(f"no readable image in {split_dir}; the first unreadable one: {failures[0][1]}", 300))
    return kept


def _load_imagefolder(
    data_dir: str | os.PathLike | None, image_size: int | None, max_bytes: int, skip_bad_images: bool = False
) -> ImageDataset:
    if data_dir is None:
        raise KDError("imagefolder needs --data-dir DIR holding train/<class>/<images> and test/<class>/<images>")
    root = Path(os.path.expanduser(os.fspath(data_dir)))
    if not root.exists():
        raise KDError(f"data directory not found: {root}")
    if not root.is_dir():
        raise KDError(f"data directory is not a directory: {root}")
    if not _scan(root, "data directory"):
        raise KDError(f"data directory is empty: {root}; expected train/<class>/<images> and test/<class>/<images>")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise KDError(f"no train/ folder in {root}; expected train/<class>/<images> and test/<class>/<images>")
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not test_dir.is_dir():
        raise KDError(f"no test/ or val/ folder in {root}; expected test/<class>/<images> beside train/")

    class_names = _class_folders(train_dir)
    test_classes = _class_folders(test_dir)
    if test_classes != class_names:
        only_train = sorted(set(class_names) - set(test_classes))
        only_test = sorted(set(test_classes) - set(class_names))
        parts = [f"only in train/: {short_list(only_train)}" if only_train else "",
                 f"only in {test_dir.name}/: {short_list(only_test)}" if only_test else ""]
        raise KDError(
            f"class folders differ between {train_dir} and {test_dir}: " + "; ".join(p for p in parts if p)
        )
    splits = {"train": (train_dir, _list_images(train_dir, class_names)),
              test_dir.name: (test_dir, _list_images(test_dir, class_names))}
    skipped: list[str] = []  # the messages of the unreadable files skipped, in order

    def drop(split: str, failures: list[tuple[int, str]]) -> list[tuple[str, int]]:
        folder, samples = splits[split]
        skipped.extend(message for _, message in failures)
        splits[split] = (folder, _drop_failures(samples, failures, folder) if failures else samples)
        return splits[split][1]

    # Geometry: the headers of a few hundred training images, spread over the classes.
    train_samples = splits["train"][1]
    picked = _spread(train_samples, _PROBE_FILES)
    headers, failures = _read_headers(
        [train_samples[i][0] for i in picked], "reading headers", skip_bad_images, workers=False
    )
    good = [header for header in headers if header is not None]
    if not good:
        first = failures[0][1]
        raise KDError(one_line(f"no readable image among {len(picked)} probed in {train_dir}; the first: {first}", 300))
    drop("train", [(picked[i], message) for i, message in failures])
    total = len(splits["train"][1])
    channels, size, note = _decide_geometry(good, image_size, total)
    total_bytes = (total + len(splits[test_dir.name][1])) * channels * size * size
    in_memory = size <= MAX_IN_MEMORY_SIDE and total_bytes <= max_bytes

    if in_memory:  # decoding reads every file: that is where unreadable ones show up
        data: dict[str, InMemorySplit] = {}
        for split in splits:
            files = [path for path, _ in splits[split][1]]
            images, failures = _decode_cached(files, channels, size, f"decoding {split}", skip_bad_images)
            if failures:
                bad = torch.zeros(len(files), dtype=torch.bool)
                bad[[index for index, _ in failures]] = True
                images = images[~bad]
            labels = torch.tensor([label for _, label in drop(split, failures)], dtype=torch.int64)
            data[split] = InMemorySplit(images, labels)
        dataset = _in_memory_dataset(
            f"imagefolder:{root.resolve().name}", class_names, data["train"], data[test_dir.name],
            default_augment("imagefolder"),
        )
    else:
        # Streaming reads each file only when a batch needs it: check every header now, so an
        # unreadable file stops the run (or is skipped) before training; geometry from all of them.
        for split in splits:
            files = [path for path, _ in splits[split][1]]
            headers, failures = _read_headers(files, f"checking {split}", skip_bad_images)
            drop(split, failures)
            if split == "train":
                good = [header for header in headers if header is not None]
                channels, size, note = _decide_geometry(good, image_size, len(good))
        dataset = _streaming_dataset(root, class_names, splits, channels, size, skip_bad_images)
    notes = [note] if note else []
    if skipped:
        notes.append(one_line(f"note: skipped {len(skipped)} unreadable image(s), the first: {skipped[0]}", 300))
    dataset.skipped_images, dataset.notes = len(skipped), tuple(notes)
    return dataset


def _streaming_dataset(
    root: Path,
    class_names: list[str],
    splits: dict[str, tuple[Path, list[tuple[str, int]]]],
    channels: int,
    size: int,
    skip_bad: bool,
) -> ImageDataset:
    from torchvision import transforms as T

    from kd.streaming import StreamingImageFolder

    loader = partial(_streaming_loader, channels=channels)
    # Both splits: the evaluation view (resize to size / 0.875, centre crop). Training with the
    # crop augmentation swaps in `kd.augment.StreamingResizedCrop` (see `kd.loader`).
    view = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.PILToTensor()])
    (train_dir, train_samples), (test_dir, test_samples) = splits.values()
    return ImageDataset(
        name=f"imagefolder:{root.resolve().name}",
        class_names=class_names,
        channels=channels,
        image_size=size,
        train=StreamingImageFolder(train_dir, class_names, train_samples, view, loader, skip_bad),
        test=StreamingImageFolder(test_dir, class_names, test_samples, view, loader, skip_bad),
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
    if data_dir is None:
        raise KDError("imagefolder needs --data-dir DIR holding train/<class>/<images>")
    root = Path(os.path.expanduser(os.fspath(data_dir)))
    if not root.exists():
        raise KDError(f"data directory not found: {root}")
    if not root.is_dir():
        raise KDError(f"data directory is not a directory: {root}")
    if not (root / "train").is_dir():
        raise KDError(f"no train/ folder in {root}; expected train/<class>/<images>")
    return _class_folders(root / "train")


def __getattr__(name: str) -> Any:
    # `kd.datasets.StreamingImageFolder` lives in `kd.streaming` (it subclasses torchvision's
    # ImageFolder, and importing torchvision costs seconds that in-memory runs never need).
    if name == "StreamingImageFolder":
        from kd.streaming import StreamingImageFolder

        return StreamingImageFolder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
