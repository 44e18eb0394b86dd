"""Shared test data: tiny ImageFolder trees made here, and a slice of the real CIFAR-10 copy."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_ZIP = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"

# The decoded-data cache (kd.data.cache) of every test, and of the commands they start, goes
# into one temporary folder, not the user's ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="kd-test-cache-")
os.environ["KD_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def make_image_folder(
    root: Path, mode: str = "RGB", classes: tuple[str, ...] = ("ant", "bee", "cat"),
    per_class: int = 6, size: int = 12, splits: tuple[str, ...] = ("train", "test"),
) -> Path:
    """An ImageFolder tree whose classes differ in brightness, so a model can learn them."""
    rng = np.random.default_rng(0)
    channels = 1 if mode == "L" else 3
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = 40 + 80 * index
                pixels = np.clip(base + rng.normal(0, 20, (size, size, channels)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / f"{i}.png")
    return root


def extract_cifar10_subset(dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """The first N images of each class of the shared CIFAR-10 JPEG copy, as an ImageFolder tree."""
    if not CIFAR10_ZIP.exists():
        pytest.skip(f"CIFAR-10 copy not found at {CIFAR10_ZIP}")
    wanted = {"train": train_per_class, "test": test_per_class}
    taken: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(CIFAR10_ZIP) as archive:
        for info in archive.infolist():
            parts = Path(info.filename).parts
            if info.is_dir() or len(parts) < 3 or parts[-3] not in wanted:
                continue
            split, label = parts[-3], parts[-2]
            if taken.get((split, label), 0) >= wanted[split]:
                continue
            taken[(split, label)] = taken.get((split, label), 0) + 1
            target = dest / split / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
    return dest


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A finished LS++ teacher run on digits (20 steps; it has a cmatrix.safetensors). Shared: copy it before changing it."""
    from tests.test_cli import kd_in_process

    out = tmp_path_factory.mktemp("teacher") / "run"
    result = kd_in_process("train-teacher", "--out", str(out), "--epochs", "1", "--max-steps", "20", "--batch-size", "32")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def cifar10_subset(tmp_path_factory) -> Path:
    return extract_cifar10_subset(tmp_path_factory.mktemp("cifar10"), train_per_class=20, test_per_class=10)
