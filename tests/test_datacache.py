"""The decoded-data cache: a repeated load reads the cache instead of decoding, any change to the
files misses it, and a cache that cannot be used never stops a run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import kd.data.decode
from kd.data.datasets import load_dataset
from tests.helpers import make_image_folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("KD_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    decode = kd.data.decode._decode_all

    def counting(files, *args, **kwargs):
        calls.append(len(files))
        return decode(files, *args, **kwargs)

    monkeypatch.setattr(kd.data.decode, "_decode_all", counting)
    return calls


def test_a_repeated_load_reads_the_cache_and_gives_the_same_images(tmp_path, cache, count_decodes):
    root = make_image_folder(tmp_path / "data")
    first = load_dataset("imagefolder", root)
    assert count_decodes == [18, 18] and len(list(cache.glob("decoded-*.safetensors"))) == 2
    again = load_dataset("imagefolder", root)
    assert count_decodes == [18, 18]  # no decoding the second time
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.images, first.test.images)
    assert torch.equal(again.train.labels, first.train.labels)
    # Another side length is another cache entry.
    resized = load_dataset("imagefolder", root, image_size=8)
    assert count_decodes == [18, 18, 18, 18] and resized.image_size == 8


def test_a_changed_file_misses_the_cache(tmp_path, cache, count_decodes):
    root = make_image_folder(tmp_path / "data")
    before = load_dataset("imagefolder", root)
    changed = root / "train" / "ant" / "0.png"
    Image.fromarray(np.full((12, 12, 3), 255, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # even an old modification time: the size differs
    after = load_dataset("imagefolder", root)
    assert count_decodes == [18, 18, 18]  # train decoded again; the unchanged test split from the cache
    assert not torch.equal(after.train.images, before.train.images)
    assert after.train.images.max() == 255


def test_cache_off_unwritable_or_corrupt_never_stops_a_run(tmp_path, monkeypatch, capfd, count_decodes):
    root = make_image_folder(tmp_path / "data")
    monkeypatch.setenv("KD_CACHE_DIR", "off")
    load_dataset("imagefolder", root)
    assert not list(tmp_path.rglob("decoded-*"))

    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("KD_CACHE_DIR", str(blocked / "cache"))
    load_dataset("imagefolder", root)
    assert "cannot write the data cache" in capfd.readouterr().err

    folder = tmp_path / "cache"
    monkeypatch.setenv("KD_CACHE_DIR", str(folder))
    expected = load_dataset("imagefolder", root)
    for entry in folder.glob("decoded-*.safetensors"):
        entry.write_bytes(b"not a safetensors file")
    count_decodes.clear()
    again = load_dataset("imagefolder", root)
    assert count_decodes == [18, 18] and torch.equal(again.train.images, expected.train.images)
    assert "ignoring the unreadable data cache" in capfd.readouterr().err
