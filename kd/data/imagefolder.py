"""Reading an ImageFolder tree: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (or ``val/``).

`read_imagefolder` scans the tree (classes and files in torchvision ImageFolder's order), decides
the geometry from the headers of a few hundred training images spread over the classes
(`decide_geometry`), and either decodes every image into memory (small images that fit) or checks
every file's header for streaming. `kd.data.datasets` turns the result into an `ImageDataset`.
Reading the files themselves is `kd.data.decode`'s business.

Which files count is decided in one place, `class_images`, which the `--resume` fingerprint
(`kd.data.fingerprint`) uses too: regular files (or links to them) with an image ending, in the
class folders and their subfolders, links to folders followed as torchvision follows them; hidden
files and folders (``.ipynb_checkpoints``) are left out. A folder reached twice (a link loop, two
links to one folder) and a name that is not one line of UTF-8 text are refused; an image name on
a special file (FIFO, socket, device) or a broken link is never opened, but is an unreadable image.
"""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Iterator, Sequence

import torch

from kd.data.decode import GRAY_MODES, Failure, Header, decode_cached, read_headers
from kd.errors import KDError, one_line, short_list

# File endings an ImageFolder tree may hold (torchvision's IMG_EXTENSIONS), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# In-memory ImageFolder data: at most this many pixels per side.
MAX_IN_MEMORY_SIDE = 64
# The image geometry is decided from the headers of this many training images (all, if fewer).
_PROBE_FILES = 512

_LAYOUT = "train/<class>/<images> and test/<class>/<images>"
# What a name the data layer shows, hashes and writes may not hold: an undecodable byte (which
# Python holds as a lone surrogate) or a control character (a line break, a tab).
_NOT_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAME = attrgetter("name")
_SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
# A split's samples: (image path, label) pairs.
Samples = list[tuple[str, int]]


@dataclass
class FolderData:
    """An ImageFolder tree, read: its classes, geometry and samples, and its images if held in memory."""

    root: Path
    class_names: list[str]
    channels: int
    size: int
    splits: dict[str, tuple[Path, Samples]]  # "train", then "test" or "val": the folder and its readable samples
    decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None  # in memory: each split's uint8 images and labels
    skipped: int  # unreadable image files left out (`skip_bad`)
    notes: tuple[str, ...]  # one-line notes for the user (mixed image sizes or modes, skipped files)

    @property
    def name(self) -> str:
        return f"imagefolder:{self.root.resolve().name}"


def is_image_file(path: str) -> bool:
    """An ImageFolder sample: a known image ending, not a hidden file (e.g. macOS `._x.jpg`)."""
    base = os.path.basename(path)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _folder_error(what: str, folder: str | os.PathLike, error: OSError) -> KDError:
    return KDError(f"cannot read {what} {folder}: {error.strerror or one_line(error, 300)}")


def _scan(folder: str | os.PathLike, what: str) -> list[os.DirEntry]:
    """The entries of `folder`; a one-line KDError naming it when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise _folder_error(what, folder, error) from None


def _check_names(folder: str, names: list[str]) -> None:
    """A one-line KDError when one of `names` (in `folder`; `folder` itself when none is given) is
    not one line of UTF-8 text. One search per folder: it runs on every image's name."""
    if _NOT_TEXT.search("/".join(names or [folder])):
        bad = next((os.path.join(folder, name) for name in names if _NOT_TEXT.search(name)), folder)
        raise KDError(f"the name of {bad!r} is not UTF-8 text on one line (an undecodable byte or a "
                      "control character such as a line break); rename it")


def _is_dir(entry: os.DirEntry) -> bool:
    """A folder, or a link to one (a link that cannot be followed is none, as for os.walk)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _root(data_dir: str | os.PathLike | None, expected: str, refuse_empty: bool) -> Path:
    """The data directory, checked as far as its train/ folder; a one-line KDError naming what is wrong."""
    if data_dir is None:
        raise KDError(f"imagefolder needs --data-dir DIR holding {expected}")
    root = Path(os.path.expanduser(os.fspath(data_dir)))
    for path in (str(root), os.path.realpath(root)):  # the real folder's name is the dataset's
        _check_names(path, [])
    if not root.exists():
        raise KDError(f"data directory not found: {root}")
    if not root.is_dir():
        raise KDError(f"data directory is not a directory: {root}")
    if refuse_empty and not _scan(root, "data directory"):
        raise KDError(f"data directory is empty: {root}; expected {expected}")
    if not (root / "train").is_dir():
        raise KDError(f"no train/ folder in {root}; expected {expected}")
    return root


def class_folders(split_dir: str | os.PathLike) -> list[str]:
    """The sorted class folders of a split (maybe none). Hidden folders (`.ipynb_checkpoints`) are no classes."""
    entries = _scan(split_dir, "folder")
    names = sorted(entry.name for entry in entries if not entry.name.startswith(".") and _is_dir(entry))
    _check_names(os.fspath(split_dir), names)
    return names


def _class_folders(split_dir: Path) -> list[str]:
    """`class_folders`, or a one-line KDError when there are none."""
    names = class_folders(split_dir)
    if not names:
        raise KDError(f"no class folders in {split_dir}; expected {split_dir}{os.sep}<class>{os.sep}<image files>")
    return names


def imagefolder_class_names(data_dir: str | os.PathLike | None) -> list[str]:
    """The sorted class folders of ``data_dir/train`` (no image is read)."""
    return _class_folders(_root(data_dir, "train/<class>/<images>", refuse_empty=False) / "train")


def class_images(
    split_dir: str | os.PathLike, class_names: Sequence[str]
) -> Iterator[tuple[str, list[os.DirEntry], list[str]]]:
    """For each class folder of a split, in order: its path, the image files that count (in
    torchvision ImageFolder's order: folders sorted by their path, files by name), and a one-line
    message for each image name that is no file to read (a special file, a broken link). See the
    module docstring for the rule; no file is opened. A one-line KDError when a folder is reached
    twice, a name is not one line of UTF-8 text, or a folder cannot be listed.
    """
    seen: dict[tuple[int, int], str] = {}  # (device, inode) of each folder read -> its path

    def enter(folder: str, what: str) -> None:
        try:
            info = os.stat(folder)
        except OSError as error:
            raise _folder_error(what, folder, error) from None
        first = seen.setdefault((info.st_dev, info.st_ino), folder)
        if first != folder:
            raise KDError(f"folder {folder} is {first} again, through a symbolic link: its images would be "
                          "read twice; remove the link")

    def images_under(class_folder: str) -> tuple[list[os.DirEntry], list[str]]:
        found: list[tuple[str, list[os.DirEntry]]] = []  # (folder, its image files sorted by name)
        bad: list[str] = []
        folders = [(class_folder, "class folder")]
        while folders:
            folder, what = folders.pop()
            enter(folder, what)
            files, names = [], []
            for entry in _scan(folder, what):
                name = entry.name
                if name.startswith("."):  # a hidden folder or file
                    continue
                try:  # both follow links; no system call for a plain file or folder on most file systems
                    is_file = entry.is_file()
                    is_dir = not is_file and entry.is_dir()
                except OSError:  # a link that cannot be followed (a loop)
                    is_file = is_dir = False
                if is_dir:
                    folders.append((entry.path, "folder"))
                elif not is_image_file(name):
                    continue
                elif is_file:
                    files.append(entry)
                else:
                    bad.append(one_line(f"cannot read image {entry.path}: {_not_a_file(entry)}", 300))
                names.append(name)
            _check_names(folder, names)
            found.append((folder, sorted(files, key=_NAME)))
        found.sort(key=lambda pair: pair[0])
        return [entry for _, files in found for entry in files], sorted(bad)

    enter(os.fspath(split_dir), "folder")
    for name in class_names:
        folder = os.path.join(split_dir, name)
        yield (folder, *images_under(folder))


def _not_a_file(entry: os.DirEntry) -> str:
    """Why an image name that is neither a folder nor a regular file (or a link to one) is no file
    to read, found without opening it: opening a FIFO blocks, a device may never end."""
    try:
        mode = entry.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link"
    except OSError as error:
        return error.strerror or one_line(error, 200)
    return f"not a regular file but {_SPECIAL.get(stat.S_IFMT(mode), 'a special file')}"


def _list_images(split_dir: Path, class_names: Sequence[str], skip_bad: bool) -> tuple[Samples, list[str]]:
    """(path, label) pairs in torchvision ImageFolder's order (see `class_images`), and the messages
    of the image names that are no file to read (a KDError for the first, unless `skip_bad`)."""
    samples: Samples = []
    skipped: list[str] = []
    for label, (folder, files, bad) in enumerate(class_images(split_dir, class_names)):
        if bad and not skip_bad:
            raise KDError(bad[0])
        if not files:
            raise KDError(f"no images in class folder {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((entry.path, label) for entry in files)
        skipped.extend(bad)
    return samples, skipped


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


def decide_geometry(headers: Sequence[Header], image_size: int | None, total: int) -> tuple[int, int, str]:
    """(channels, side, note) for a dataset from the (mode, width, height) of `headers`, read from
    that many of its `total` training images.

    The side is the longer side of the most common size (or `image_size`); the dataset is RGB if
    any image is colour. The note is one line when sizes or modes are mixed, else empty.
    """
    sizes = Counter((width, height) for _, width, height in headers)
    (width, height), common = sizes.most_common(1)[0]
    side = image_size if image_size is not None else max(width, height)
    gray = sum(mode in GRAY_MODES for mode, _, _ in headers)
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


def _drop_failures(samples: Samples, failures: Sequence[Failure], split_dir: Path) -> Samples:
    """`samples` less the failed ones; a KDError when none is left."""
    bad = {index for index, _ in failures}
    kept = [sample for index, sample in enumerate(samples) if index not in bad]
    if not kept:
        raise KDError(one_line(f"no readable image in {split_dir}; the first unreadable one: {failures[0][1]}", 300))
    return kept


def _check_test_classes(train_dir: Path, test_dir: Path, class_names: list[str]) -> None:
    test_classes = _class_folders(test_dir)
    if test_classes != class_names:
        only_train = sorted(set(class_names) - set(test_classes))
        only_test = sorted(set(test_classes) - set(class_names))
        parts = [f"only in train/: {short_list(only_train)}" if only_train else "",
                 f"only in {test_dir.name}/: {short_list(only_test)}" if only_test else ""]
        raise KDError(
            f"class folders differ between {train_dir} and {test_dir}: " + "; ".join(p for p in parts if p)
        )


def read_imagefolder(
    data_dir: str | os.PathLike | None, image_size: int | None, max_bytes: int, skip_bad: bool = False
) -> FolderData:
    """Scan, probe and read the ImageFolder tree under `data_dir` (see `kd.data.datasets.load_dataset`).

    The data is decoded into memory when its side is at most `MAX_IN_MEMORY_SIDE` and both splits
    fit in `max_bytes`; otherwise every file's header is checked now, for streaming later.
    """
    root = _root(data_dir, _LAYOUT, refuse_empty=True)
    train_dir = root / "train"
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not test_dir.is_dir():
        raise KDError(f"no test/ or val/ folder in {root}; expected test/<class>/<images> beside train/")

    class_names = _class_folders(train_dir)
    _check_test_classes(train_dir, test_dir, class_names)
    splits: dict[str, tuple[Path, Samples]] = {}
    skipped: list[str] = []  # the messages of the unreadable files skipped, in order
    for split, folder in (("train", train_dir), (test_dir.name, test_dir)):
        samples, bad = _list_images(folder, class_names, skip_bad)
        splits[split] = (folder, samples)
        skipped.extend(bad)

    def drop(split: str, failures: list[Failure]) -> Samples:
        folder, samples = splits[split]
        skipped.extend(message for _, message in failures)
        splits[split] = (folder, _drop_failures(samples, failures, folder) if failures else samples)
        return splits[split][1]

    # Geometry: the headers of a few hundred training images, spread over the classes.
    train_samples = splits["train"][1]
    picked = _spread(train_samples, _PROBE_FILES)
    headers, failures = read_headers([train_samples[i][0] for i in picked], "reading headers", skip_bad, workers=False)
    good = [header for header in headers if header is not None]
    if not good:
        first = failures[0][1]
        raise KDError(one_line(f"no readable image among {len(picked)} probed in {train_dir}; the first: {first}", 300))
    drop("train", [(picked[i], message) for i, message in failures])
    total = len(splits["train"][1])
    channels, size, note = decide_geometry(good, image_size, total)
    total_bytes = (total + len(splits[test_dir.name][1])) * channels * size * size
    decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    if size <= MAX_IN_MEMORY_SIDE and total_bytes <= max_bytes:  # decoding reads every file: bad ones show up
        decoded = {}
        for split in splits:
            files = [path for path, _ in splits[split][1]]
            images, failures = decode_cached(files, channels, size, f"decoding {split}", skip_bad)
            if failures:
                bad = torch.zeros(len(files), dtype=torch.bool)
                bad[[index for index, _ in failures]] = True
                images = images[~bad]
            decoded[split] = (images, torch.tensor([label for _, label in drop(split, failures)], dtype=torch.int64))
    else:
        # Streaming reads each file only when a batch needs it: check every header now, so an
        # unreadable file stops the run (or is skipped) before training; geometry from all of them.
        for split in splits:
            files = [path for path, _ in splits[split][1]]
            headers, failures = read_headers(files, f"checking {split}", skip_bad)
            drop(split, failures)
            if split == "train":
                good = [header for header in headers if header is not None]
                channels, size, note = decide_geometry(good, image_size, len(good))
    notes = [note] if note else []
    if skipped:
        notes.append(one_line(f"note: skipped {len(skipped)} unreadable image(s), the first: {skipped[0]}", 300))
    return FolderData(root, class_names, channels, size, splits, decoded, len(skipped), tuple(notes))
