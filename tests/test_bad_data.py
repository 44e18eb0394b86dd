"""Bad ImageFolder data: corrupt or truncated images, unreadable folders, hidden folders.

Every problem ends in one short `KDError` line that names the file or folder, on the in-memory
(decode) path and on the streaming (DataLoader worker) path alike; `skip_bad_images=True`
leaves unreadable images out and counts them.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kd.data.decode as decode
from kd.data.datasets import dataset_class_names, load_dataset
from kd.errors import KDError
from kd.data.loader import DeviceBatches
from tests.helpers import assert_one_line_kderror, make_tree

STREAM = {"max_in_memory_bytes": 1}  # load_dataset keywords that force the streaming path


# A short error from the data path: under 300 characters and without traceback text.
SHORT_KDERROR = {"shorter_than": 300, "absent": ("Traceback", 'File "', "DataLoader worker")}


def garbage_jpg(path: Path) -> Path:
    path.write_bytes(b"this is no JPEG at all " * 8)
    return path


def truncated_jpg(path: Path) -> Path:
    """A JPEG whose header is intact (PIL opens it) but whose compressed data is cut short."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    with Image.open(path) as image:
        assert image.size == (32, 32)
    return path


def all_batches(data, split: str, num_workers: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    batches = DeviceBatches(data, split, 4, torch.device("cpu"), num_workers=num_workers, training=False)
    return list(batches)


@pytest.fixture
def workers(monkeypatch):
    """Small decode chunks, so the in-memory path decodes in DataLoader worker processes."""
    monkeypatch.setattr(decode, "_MIN_CHUNK", 2)
    monkeypatch.setattr(decode, "_MAX_CHUNK", 2)


# ----------------------------------------------------------------------------- a corrupt file stops the load


@pytest.mark.parametrize("keywords", [{}, STREAM], ids=["in-memory", "streaming"])
@pytest.mark.parametrize("make_bad", [garbage_jpg, truncated_jpg], ids=["garbage", "truncated"])
def test_corrupt_jpg_is_one_short_line_naming_the_file(tmp_path, workers, keywords, make_bad):
    make_tree(tmp_path / "data")
    bad = make_bad(tmp_path / "data" / "test" / "bee" / "broken.jpg")
    with pytest.raises(KDError) as excinfo:
        data = load_dataset("imagefolder", tmp_path / "data", **keywords)
        all_batches(data, "test", num_workers=2)  # streaming: a truncated file is only found when read
    assert_one_line_kderror(excinfo, "cannot read image", str(bad), **SHORT_KDERROR)


def test_streaming_checks_every_header_before_training(tmp_path):
    make_tree(tmp_path, per_class=3)
    bad = garbage_jpg(tmp_path / "train" / "cat" / "001-garbage.jpg")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path, **STREAM)
    assert_one_line_kderror(excinfo, str(bad), "not an image file", **SHORT_KDERROR)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_worker_error_is_reraised_as_one_short_line(tmp_path, num_workers):
    """Only the pixel data is broken: the header check passes, the DataLoader worker fails."""
    make_tree(tmp_path)
    bad = truncated_jpg(tmp_path / "train" / "ant" / "zz-cut.jpg")
    data = load_dataset("imagefolder", tmp_path, image_size=72)  # over 64 px: streamed
    assert not data.in_memory and len(data.train) == 10
    with pytest.raises(KDError) as excinfo:
        all_batches(data, "train", num_workers)
    assert_one_line_kderror(excinfo, str(bad), "truncated", **SHORT_KDERROR)
    assert multiprocessing.active_children() == []  # the workers are stopped, not left to a garbage collection


def test_unreadable_image_file_is_named(tmp_path, monkeypatch):
    make_tree(tmp_path)
    target = str(tmp_path / "test" / "cat" / "001.png")  # as if chmod 0 (root reads anyway)
    for module, name in ((np, "fromfile"), (Image, "open")):
        monkeypatch.setattr(module, name, _denying(getattr(module, name), target))
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    message = assert_one_line_kderror(excinfo, target, "Permission denied", **SHORT_KDERROR)
    assert message == f"cannot read image {target}: Permission denied"


def _denying(real, target: str):
    """`real`, except that opening `target` fails as a file without read permission does."""

    def wrapper(path, *args, **kwargs):
        if os.fspath(path) == target:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- skip_bad_images


def test_skip_bad_images_in_memory_drops_and_counts_them(tmp_path, workers):
    values = make_tree(tmp_path, per_class=4)
    garbage_jpg(tmp_path / "train" / "bee" / "002.5.jpg")  # found by the header probe
    truncated_jpg(tmp_path / "train" / "cat" / "000.5.jpg")  # found by decoding
    truncated_jpg(tmp_path / "test" / "ant" / "009.jpg")
    data = load_dataset("imagefolder", tmp_path, skip_bad_images=True)
    assert data.in_memory and data.skipped_images == 3
    assert len(data.train) == 12 and len(data.test) == 12
    for split in (data.train, data.test):
        assert torch.bincount(split.labels).tolist() == [4, 4, 4]
        for image, label in zip(split.images, split.labels):  # images and labels still line up
            assert int(image[0, 3, 3]) == values[data.class_names[int(label)]]
    assert any("skipped 3 unreadable image" in note for note in data.notes)
    assert all("\n" not in note and len(note) < 300 for note in data.notes)
    assert "3 unreadable images skipped" in data.describe()


def test_without_skip_the_same_tree_fails(tmp_path):
    make_tree(tmp_path)
    truncated_jpg(tmp_path / "train" / "cat" / "000.5.jpg")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    assert_one_line_kderror(excinfo, "000.5.jpg", **SHORT_KDERROR)


def test_skip_bad_images_streaming(tmp_path, capfd):
    make_tree(tmp_path)
    garbage_jpg(tmp_path / "train" / "bee" / "zz-garbage.jpg")  # found by the header check
    late = truncated_jpg(tmp_path / "test" / "bee" / "zz-cut.jpg")  # header fine: found when read
    data = load_dataset("imagefolder", tmp_path, skip_bad_images=True, **STREAM)
    assert not data.in_memory and data.skipped_images == 1
    assert len(data.train) == 9 and len(data.test) == 10
    batches = all_batches(data, "test", num_workers=2)
    labels = torch.cat([labels for _, labels, _, _ in batches])
    assert len(labels) == 10  # the unreadable one is stood in for by the next sample
    assert str(late) in capfd.readouterr().err


def test_skip_bad_images_with_no_readable_image_left(tmp_path):
    make_tree(tmp_path)
    for image in (tmp_path / "test" / "cat").iterdir():
        garbage_jpg(image)
    for image in (tmp_path / "test").rglob("*.png"):
        if image.parent.name != "cat":
            truncated_jpg(image)
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path, skip_bad_images=True)
    assert_one_line_kderror(excinfo, "no readable image", str(tmp_path / "test"), **SHORT_KDERROR)


# ----------------------------------------------------------------------------- folders


def test_unreadable_class_folder_is_named(tmp_path, monkeypatch):
    make_tree(tmp_path)
    locked = str(tmp_path / "test" / "bee")
    monkeypatch.setattr(os, "scandir", _denying(os.scandir, locked))  # as if chmod 0 (root reads anyway)
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    message = assert_one_line_kderror(excinfo, "cannot read class folder", locked, "Permission denied", **SHORT_KDERROR)
    assert "no images" not in message


def test_unreadable_class_folder_for_real(tmp_path):
    make_tree(tmp_path)
    locked = tmp_path / "train" / "ant"
    locked.chmod(0)
    try:
        try:
            os.listdir(locked)
        except PermissionError:
            pass
        else:
            pytest.skip("this user reads a folder of mode 000 anyway (root)")
        with pytest.raises(KDError) as excinfo:
            load_dataset("imagefolder", tmp_path)
    finally:
        locked.chmod(0o755)
    assert_one_line_kderror(excinfo, "cannot read class folder", str(locked), **SHORT_KDERROR)


def test_unreadable_split_folder_is_named(tmp_path, monkeypatch):
    make_tree(tmp_path)
    locked = str(tmp_path / "train")
    monkeypatch.setattr(os, "scandir", _denying(os.scandir, locked))
    for call in (lambda: load_dataset("imagefolder", tmp_path), lambda: dataset_class_names("imagefolder", tmp_path)):
        with pytest.raises(KDError) as excinfo:
            call()
        assert_one_line_kderror(excinfo, "cannot read folder", locked, "Permission denied", **SHORT_KDERROR)


def test_hidden_class_folders_and_files_are_skipped(tmp_path):
    """Unlike torchvision's ImageFolder, `.ipynb_checkpoints` (or any dot-folder) is no class."""
    make_tree(tmp_path)
    for split in ("train", "test"):
        hidden = tmp_path / split / ".ipynb_checkpoints"
        hidden.mkdir()
        Image.new("RGB", (6, 6), (1, 2, 3)).save(hidden / "000-checkpoint.png")
        garbage_jpg(tmp_path / split / "ant" / "._000.jpg")  # macOS resource fork: hidden, never read
    (tmp_path / "test" / ".cache").mkdir()  # a hidden folder in one split only: classes still match
    data = load_dataset("imagefolder", tmp_path)
    assert data.class_names == ["ant", "bee", "cat"] and data.skipped_images == 0
    assert len(data.train) == 9 and len(data.test) == 9
    assert dataset_class_names("imagefolder", tmp_path) == ["ant", "bee", "cat"]
