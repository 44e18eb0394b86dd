"""A fingerprint of a run's data, so `--resume` notices a different dataset behind the same flags.

For an ImageFolder tree: the number of image files under train/ and test/ (or val/) and a
hash of their sorted relative paths and sizes (no image is read: a stat per file). For the
built-in and torchvision datasets: their identity, name and split sizes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kd.datasets import ImageDataset, is_image_file, normalise_dataset_name


def _image_files(root: Path) -> list[tuple[str, int]]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden folders are not classes
        for name in files:
            if is_image_file(name):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return sorted(found)


def data_fingerprint(data: ImageDataset, dataset: str, data_dir: str | os.PathLike | None) -> str:
    """"N files, sha256:..." for an ImageFolder tree; "NAME: N train, M test" otherwise."""
    if normalise_dataset_name(dataset) != "imagefolder" or data_dir is None:
        return f"{data.name}: {len(data.train)} train, {len(data.test)} test"
    root = Path(data_dir).expanduser()
    digest = hashlib.sha256()
    count = 0
    for split in ("train", "test", "val"):
        for relative, size in _image_files(root / split) if (root / split).is_dir() else []:
            digest.update(f"{split}/{relative}\t{size}\n".encode())
            count += 1
    return f"{count} files, sha256:{digest.hexdigest()[:16]}"
