"""One data layer for every dataset: a name (and a directory) in, class names and images out.

`load_dataset` returns an `ImageDataset`: the class names, the image geometry, the
normalisation statistics, the augmentations that suit the data, and the two splits. A split
is either an `InMemorySplit` (every image decoded once into one uint8 N x C x H x W tensor,
for small images) or a streaming `torch.utils.data.Dataset` that yields
(uint8 C x S x S tensor, int label) pairs (for large ImageFolder trees). Batching, sharding,
on-device augmentation and normalisation are `kd.loader`'s business, not this module's.

Datasets:

* ``digits``: scikit-learn's bundled 8x8 digits (no directory, no download).
* ``cifar10``, ``cifar100``, ``mnist``, ``fashionmnist``, ``svhn``: torchvision's classes over
  ``data_dir``; nothing is downloaded unless ``download=True``.
* ``imagefolder``: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (or ``val/``).

Every problem a user can fix is raised as a one-line `KDError`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from kd.errors import KDError

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

# name -> (torchvision class, display name, hflip, crop padding at the native size)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "CIFAR-10", True, 4),
    "cifar100": ("CIFAR100", "CIFAR-100", True, 4),
    "mnist": ("MNIST", "MNIST", False, 2),
    "fashionmnist": ("FashionMNIST", "Fashion-MNIST", True, 2),
    "svhn": ("SVHN", "SVHN", False, 4),
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
    hflip: bool
    crop_padding: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        where = "in memory" if self.in_memory else "streaming"
        return (
            f"{self.name}: {self.num_classes} classes, {len(self.train)} train / {len(self.test)} test, "
            f"{self.channels}x{self.image_size}x{self.image_size}, {where}"
        )


def load_dataset(
    name: str = "digits",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    max_in_memory_bytes: int = 4 * 2**30,
) -> ImageDataset:
    """Load dataset `name` (one of `DATASET_NAMES`) from `data_dir`.

    `image_size` (optional) is the square side the model sees: ImageFolder images are decoded
    or cropped to it; the fixed-size datasets are resized to it in memory when it differs from
    their native size. ImageFolder data is held in memory when `image_size <= 64` and all of it
    fits in `max_in_memory_bytes`; otherwise it is streamed from disk.
    """
    key = "".join(str(name).strip().lower().replace("-", "").replace("_", "").split())
    if key not in DATASET_NAMES:
        raise KDError(f"unknown dataset {str(name)!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise KDError(f"image size must be a positive whole number of pixels, got {image_size!r}")
    if key == "imagefolder":
        return _load_imagefolder(data_dir, image_size, max_in_memory_bytes)
    dataset = _load_digits() if key == "digits" else _load_torchvision(key, data_dir, download)
    if image_size is not None and image_size != dataset.image_size:
        dataset = _resize_in_memory(dataset, image_size, max_in_memory_bytes)
    return dataset


# ----------------------------------------------------------------------------- helpers


def _one_line(error: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    name: str, class_names: list[str], train: InMemorySplit, test: InMemorySplit, hflip: bool, crop_padding: int
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
        hflip=hflip,
        crop_padding=crop_padding,
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
    padding = max(1, round(dataset.crop_padding * size / dataset.image_size)) if dataset.crop_padding else 0
    return _in_memory_dataset(dataset.name, dataset.class_names, train, test, dataset.hflip, padding)


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
    return _in_memory_dataset("digits", [str(d) for d in range(10)], train, test, hflip=False, crop_padding=1)


# ----------------------------------------------------------------------------- torchvision datasets


def _load_torchvision(key: str, data_dir: str | os.PathLike | None, download: bool) -> ImageDataset:
    import torchvision.datasets

    class_name, display, hflip, crop_padding = _TORCHVISION[key]
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
                raise KDError(f"could not download {display} into {root}: {_one_line(error)}") from None
            if isinstance(error, RuntimeError):
                raise KDError(
                    f"no {display} data under {root}; pass --download to fetch it, or point --data-dir at it"
                ) from None
            raise KDError(f"cannot read the {display} data under {root}: {_one_line(error)}") from None

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
    return _in_memory_dataset(key, class_names, splits[0], splits[1], hflip=hflip, crop_padding=crop_padding)


# ----------------------------------------------------------------------------- imagefolder


def _is_image_file(path: str) -> bool:
    """An ImageFolder sample: a known image ending, not a hidden file (e.g. macOS `._x.jpg`)."""
    base = os.path.basename(path)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(split_dir: Path) -> list[str]:
    names = sorted(
        entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not names:
        raise KDError(f"no class folders in {split_dir}; expected {split_dir}{os.sep}<class>{os.sep}<image files>")
    return names


def _list_images(split_dir: Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) pairs in torchvision ImageFolder's order: classes sorted, then files sorted."""
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(class_names):
        folder = os.path.join(split_dir, name)
        found = 0
        for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
            for filename in sorted(filenames):
                path = os.path.join(dirpath, filename)
                if _is_image_file(path):
                    samples.append((path, label))
                    found += 1
        if found == 0:
            raise KDError(f"no images in class folder {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return samples


def _short_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


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
        raise KDError(f"cannot read image {path}: {_one_line(error)}") from None


def _streaming_loader(path: str, channels: int = 3) -> Any:
    return _pil_open(path, channels)


def _probe(path: str) -> tuple[str, int, int]:
    """PIL mode, width and height of an image, from its header."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode, image.size[0], image.size[1]
    except Exception as error:
        raise KDError(f"cannot read image {path}: {_one_line(error)}") from None


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
        except (RuntimeError, ImportError, ValueError):
            image = None  # unsupported or corrupt: PIL decides (and names the error)
    if image is None:
        array = np.asarray(_pil_open(path, channels))
        image = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)
    if image.shape[-2:] != (size, size):
        from torchvision.transforms.v2 import functional as TF

        image = TF.resize(image.unsqueeze(0), [size, size], antialias=True)[0]
    return image


class _DecodeChunks(Dataset):
    """Item i = (start, uint8 images of files[start:start+chunk], first failure or None)."""

    def __init__(self, files: list[str], channels: int, size: int, chunk: int) -> None:
        self.files, self.channels, self.size, self.chunk = files, channels, size, chunk

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.chunk)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, tuple[int, str] | None]:
        start = index * self.chunk
        paths = self.files[start : start + self.chunk]
        out = torch.empty((len(paths), self.channels, self.size, self.size), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision >= 0.29 deprecates its decoders; PIL's noise
            for offset, path in enumerate(paths):
                try:
                    out[offset] = _decode_one(path, self.channels, self.size)
                except Exception as error:  # reported, with the file's name, by the main process
                    return start, out, (start + offset, str(error))
        return start, out, None


def _identity(item: Any) -> Any:
    return item


def _decode_all(files: list[str], channels: int, size: int, desc: str) -> torch.Tensor:
    """Decode `files` into one uint8 N x C x size x size tensor with DataLoader worker processes."""
    from tqdm import tqdm

    out = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    chunk = max(_MIN_CHUNK, min(_MAX_CHUNK, _CHUNK_BYTES // (channels * size * size)))
    chunks = _DecodeChunks(files, channels, size, chunk)
    workers = min(4, os.cpu_count() or 1, len(chunks)) if len(chunks) > 1 else 0
    loader = DataLoader(chunks, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity)
    with tqdm(total=len(files), desc=desc, leave=False, file=sys.stderr, unit="img", disable=None) as progress:
        for start, images, failure in loader:
            if failure is not None:
                index, message = failure
                message = _one_line(message)
                if message.startswith("cannot read image "):
                    raise KDError(message)
                raise KDError(f"cannot read image {files[index]}: {message}")
            out[start : start + images.shape[0]] = images
            progress.update(images.shape[0])
    return out


class _StreamingImageFolder(ImageFolder):
    """torchvision's ImageFolder over an already-checked (path, label) list (no second directory walk).

    Module-level so DataLoader workers started with spawn or forkserver can unpickle it.
    """

    def __init__(
        self, root: Path, class_names: list[str], samples: list[tuple[str, int]], transform: Callable, loader: Callable
    ) -> None:
        self._kd_class_names = list(class_names)
        self._kd_samples = list(samples)
        super().__init__(str(root), transform=transform, loader=loader)

    def find_classes(self, directory: Any) -> tuple[list[str], dict[str, int]]:
        return list(self._kd_class_names), {name: i for i, name in enumerate(self._kd_class_names)}

    def make_dataset(self, directory: Any, *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        return list(self._kd_samples)


def _load_imagefolder(data_dir: str | os.PathLike | None, image_size: int | None, max_bytes: int) -> ImageDataset:
    if data_dir is None:
        raise KDError("imagefolder needs --data-dir DIR holding train/<class>/<images> and test/<class>/<images>")
    root = Path(os.path.expanduser(os.fspath(data_dir)))
    if not root.exists():
        raise KDError(f"data directory not found: {root}")
    if not root.is_dir():
        raise KDError(f"data directory is not a directory: {root}")
    if not any(root.iterdir()):
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
        parts = [f"only in train/: {_short_list(only_train)}" if only_train else "",
                 f"only in {test_dir.name}/: {_short_list(only_test)}" if only_test else ""]
        raise KDError(
            f"class folders differ between {train_dir} and {test_dir}: " + "; ".join(p for p in parts if p)
        )
    train_samples = _list_images(train_dir, class_names)
    test_samples = _list_images(test_dir, class_names)

    mode, width, height = _probe(train_samples[0][0])
    channels = 1 if mode in _GRAY_MODES else 3
    size = image_size if image_size is not None else max(width, height)
    name = f"imagefolder:{root.resolve().name}"
    total_bytes = (len(train_samples) + len(test_samples)) * channels * size * size

    if size <= MAX_IN_MEMORY_SIDE and total_bytes <= max_bytes:
        splits = []
        for split, samples in (("train", train_samples), (test_dir.name, test_samples)):
            images = _decode_all([path for path, _ in samples], channels, size, f"decoding {split}")
            labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
            splits.append(InMemorySplit(images, labels))
        return _in_memory_dataset(name, class_names, splits[0], splits[1], hflip=True, crop_padding=max(1, size // 8))

    from torchvision import transforms as T

    loader = partial(_streaming_loader, channels=channels)
    train_tf = T.Compose([T.RandomResizedCrop(size), T.PILToTensor()])
    test_tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.PILToTensor()])
    return ImageDataset(
        name=name,
        class_names=class_names,
        channels=channels,
        image_size=size,
        train=_StreamingImageFolder(train_dir, class_names, train_samples, train_tf, loader),
        test=_StreamingImageFolder(test_dir, class_names, test_samples, test_tf, loader),
        in_memory=False,
        hflip=True,
        crop_padding=0,
        mean=IMAGENET_MEAN if channels == 3 else GRAY_MEAN,
        std=IMAGENET_STD if channels == 3 else GRAY_STD,
    )


def dataset_class_names(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The class names of dataset `name`, in label order, without decoding ImageFolder images.

    digits: "0".."9"; imagefolder: the sorted class folders of ``data_dir/train``; the
    torchvision datasets are opened with `load_dataset` (their names live in the data files).
    """
    key = "".join(str(name).strip().lower().replace("-", "").replace("_", "").split())
    if key not in DATASET_NAMES:
        raise KDError(f"unknown dataset {str(name)!r}; choose one of: {', '.join(DATASET_NAMES)}")
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
