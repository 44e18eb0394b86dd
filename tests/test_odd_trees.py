"""Odd ImageFolder trees: links, special files, odd names, hidden subfolders, decompression bombs.

Each tree is either read with every image counted once (in torchvision ImageFolder's order), the
listing and the `--resume` fingerprint agreeing on which files count, or refused in one short
`KDError` line naming the path. A special file (FIFO, socket, device) is never opened.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import stat
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd.data.datasets import dataset_class_names, load_dataset
from kd.data.fingerprint import data_fingerprint
from kd.errors import KDError
from tests.helpers import assert_one_line_error, assert_one_line_kderror, kd_in_process, make_tree

STREAM = {"image_size": 80}  # over 64 px: the streaming path
SHORT = {"shorter_than": 300, "absent": ("Traceback",)}
NINE = 9  # images per split in make_tree's tree: 3 classes x 3


@pytest.fixture
def data(tmp_path) -> Path:
    make_tree(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def no_hang():
    """Interrupt a read that blocks (a FIFO opened) after 20 s, and every 5 s after, instead of hanging."""

    def timeout(*_):
        raise TimeoutError("blocked: a special file was opened")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 20, 5)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The files named x.* that PIL or numpy was asked to open (each attempt fails, as for a file
    without read permission: nothing blocks)."""
    attempts: list[str] = []
    for module, name in ((Image, "open"), (np, "fromfile")):
        real = getattr(module, name)

        def recording(path, *args, real=real, **kwargs):
            if os.path.basename(os.fspath(path)).startswith("x."):
                attempts.append(os.fspath(path))
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(module, name, recording)
    return attempts


def fingerprint(root: Path, **keywords) -> str:
    return data_fingerprint(load_dataset("imagefolder", root, **keywords), "imagefolder", root)


def png(path: Path | io.BytesIO, value: int = 100, size: int = 6) -> None:
    pixels = np.full((size, size, 3), value, np.uint8)
    pixels[0, 0] = 255
    Image.fromarray(pixels).save(path, "PNG")


# ----------------------------------------------------------------------------- links


@pytest.mark.parametrize("target", ["..", "."], ids=["to-parent", "to-itself"])
@pytest.mark.parametrize("keywords", [{}, STREAM], ids=["in-memory", "streaming"])
def test_symlink_loop_is_refused_naming_the_link(data, target, keywords):
    """Before: os.walk followed cat/sub -> .. until the kernel's link limit: 369 (or 129) train images."""
    os.symlink(target, data / "train" / "cat" / "sub")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", data, **keywords)
    assert_one_line_kderror(excinfo, str(data / "train" / "cat" / "sub"), "symbolic link", **SHORT)


def test_link_to_a_sibling_class_is_refused(data):
    """Before: bee's images were read twice, once as cat (12 train images)."""
    os.symlink("../bee", data / "train" / "cat" / "bees")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", data)
    assert_one_line_kderror(excinfo, str(data / "train" / "bee"), str(data / "train" / "cat" / "bees"), **SHORT)


def test_linked_class_folder_is_read_and_fingerprinted(data, tmp_path):
    """Before: the listing followed train/cat -> elsewhere, the fingerprint did not (15 files, not 18),
    so `--resume` missed a change there."""
    plain = fingerprint(data)
    shutil.move(data / "train" / "cat", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", data / "train" / "cat")
    loaded = load_dataset("imagefolder", data)
    assert len(loaded.train) == NINE and data_fingerprint(loaded, "imagefolder", data) == plain
    png(tmp_path / "elsewhere" / "000.png", size=16)  # another image (and size) behind the link
    assert fingerprint(data) != plain


def test_class_link_that_loops_is_no_class(data):
    """Before: train/dog -> dog ended in an OSError traceback (Too many levels of symbolic links);
    now it is no folder, as a broken link is none."""
    os.symlink("dog", data / "train" / "dog")
    assert load_dataset("imagefolder", data).class_names == ["ant", "bee", "cat"]
    assert dataset_class_names("imagefolder", data) == ["ant", "bee", "cat"]
    assert fingerprint(data).startswith(f"{2 * NINE} files")


def test_linked_image_file_is_read(data):
    os.symlink("000.png", data / "train" / "cat" / "link.png")
    assert len(load_dataset("imagefolder", data).train) == NINE + 1
    assert fingerprint(data).startswith(f"{2 * NINE + 1} files")


# ----------------------------------------------------------------------------- special files and broken links


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return "FIFO"


def _socket(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return "socket"


def _device(path: Path) -> str:
    try:
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: reading it never ends
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    return "device"


def _link_to_device(path: Path) -> str:
    os.symlink("/dev/zero", path)
    return "device"


def _broken_link(path: Path) -> str:
    os.symlink("nowhere.png", path)
    return "broken symbolic link"


def _link_to_itself(path: Path) -> str:
    os.symlink(path.name, path)
    return "Too many levels of symbolic links"


SPECIAL = [_fifo, _socket, _device, _link_to_device, _broken_link, _link_to_itself]


@pytest.mark.parametrize("keywords", [{}, STREAM], ids=["in-memory", "streaming"])
@pytest.mark.parametrize("make", SPECIAL, ids=lambda make: make.__name__.strip("_"))
def test_special_file_is_never_opened_and_is_named(data, no_hang, opened, make, keywords):
    """Before: a FIFO hung the run for ever; the others were opened (a socket, /dev/zero) and failed
    in PIL's or the kernel's words."""
    bad = data / "test" / "bee" / "x.png"
    kind = make(bad)
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", data, **keywords)
    assert_one_line_kderror(excinfo, f"cannot read image {bad}", kind, **SHORT)
    assert opened == []


@pytest.mark.parametrize("make", [_fifo, _broken_link], ids=["fifo", "broken-link"])
def test_skip_bad_images_leaves_a_special_file_out_and_counts_it(data, no_hang, opened, make):
    make(data / "train" / "ant" / "x.png")
    loaded = load_dataset("imagefolder", data, skip_bad_images=True)
    assert (len(loaded.train), len(loaded.test), loaded.skipped_images) == (NINE, NINE, 1)
    assert fingerprint(data, skip_bad_images=True).startswith(f"{2 * NINE} files")
    assert opened == []


def test_folder_named_like_an_image_is_walked_into(data):
    (data / "train" / "cat" / "x.png").mkdir()
    png(data / "train" / "cat" / "x.png" / "inside.png")
    (data / "train" / "bee" / "empty.png").mkdir()
    assert len(load_dataset("imagefolder", data).train) == NINE + 1
    assert fingerprint(data).startswith(f"{2 * NINE + 1} files")


def test_zero_byte_image_is_named(data):
    (data / "test" / "ant" / "x.png").write_bytes(b"")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", data)
    assert_one_line_kderror(excinfo, str(data / "test" / "ant" / "x.png"), **SHORT)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000 anyway")
def test_unreadable_image_is_named(data):
    bad = data / "train" / "bee" / "001.png"
    bad.chmod(0)
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", data)
    assert_one_line_kderror(excinfo, str(bad), "Permission denied", **SHORT)


# ----------------------------------------------------------------------------- names


def _rename_class(data: Path, new: bytes) -> Path:
    for split in ("train", "test"):
        os.rename(data / split / "cat", os.fsencode(data / split) + b"/" + new)
    return Path(os.fsdecode(os.fsencode(data / "train") + b"/" + new))


@pytest.mark.parametrize(
    "make",
    [
        lambda data: png(Path(os.fsdecode(os.fsencode(data / "train" / "cat") + b"/caf\xe9.png"))),
        lambda data: png(data / "train" / "cat" / "a\nb.png"),
        lambda data: png(data / "train" / "cat" / "a\tb.png"),
        lambda data: _rename_class(data, b"c\xe4t"),
        lambda data: _rename_class(data, b"c\nat"),
    ],
    ids=["file-not-utf8", "file-newline", "file-tab", "class-not-utf8", "class-newline"],
)
@pytest.mark.parametrize("keywords", [{}, STREAM], ids=["in-memory", "streaming"])
def test_name_that_is_not_one_line_of_utf8_is_refused(data, make, keywords):
    """Before: a name that is not UTF-8 ended in a UnicodeEncodeError traceback (the cache key, the
    fingerprint); a line break or tab was read, and broke soft-label files and one-line messages later."""
    make(data)
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", data, **keywords)
    assert_one_line_kderror(excinfo, "not UTF-8 text", str(data / "train" / "c")[:-1], **SHORT)


def test_class_name_that_is_not_utf8_is_refused_by_class_names_too(data):
    _rename_class(data, b"c\xe4t")
    with pytest.raises(KDError) as excinfo:
        dataset_class_names("imagefolder", data)
    assert_one_line_kderror(excinfo, "not UTF-8 text", "c\\udce4t", **SHORT)


def test_data_directory_that_is_not_utf8_is_refused(data, tmp_path):
    """Before: the dataset's name (the folder's) ended in a UnicodeEncodeError when written."""
    odd = os.fsencode(tmp_path) + b"/d\xe4ta"
    os.rename(data, odd)
    os.symlink(odd, tmp_path / "link")
    for root in (os.fsdecode(odd), tmp_path / "link"):
        with pytest.raises(KDError) as excinfo:
            load_dataset("imagefolder", root)
        assert_one_line_kderror(excinfo, "not UTF-8 text", "d\\udce4ta", **SHORT)


def test_odd_but_valid_names_read_in_torchvision_order(data):
    """Leading '-', spaces, non-ASCII, a long name, an upper-case ending, nested folders: read as
    torchvision's ImageFolder reads them, in its order (folders sorted by their whole path)."""
    cat = data / "train" / "cat"
    for name in ("-rf.png", " café 猫 .png", "x" * 250 + ".png", "UP.PNG"):
        png(cat / name)
    for sub in ("a", "a-b", "a/x"):
        (cat / sub).mkdir(parents=True)
        png(cat / sub / "i.png")
    from torchvision.datasets import ImageFolder

    loaded = load_dataset("imagefolder", data, **STREAM)
    assert loaded.train.samples == ImageFolder(str(data / "train")).samples
    assert len(loaded.train) == NINE + 7 and fingerprint(data).startswith(f"{2 * NINE + 7} files")


# ----------------------------------------------------------------------------- hidden subfolders


@pytest.mark.parametrize("keywords", [{}, STREAM], ids=["in-memory", "streaming"])
def test_hidden_subfolder_of_a_class_is_left_out_by_listing_and_fingerprint(data, keywords):
    """Before: the listing read the .ipynb_checkpoints copies (11 train images), the fingerprint did not."""
    plain = fingerprint(data)
    hidden = data / "train" / "cat" / ".ipynb_checkpoints"
    hidden.mkdir()
    for name in ("000", "001"):
        shutil.copy(data / "train" / "cat" / f"{name}.png", hidden / f"{name}-checkpoint.png")
    loaded = load_dataset("imagefolder", data, **keywords)
    assert len(loaded.train) == NINE and data_fingerprint(loaded, "imagefolder", data) == plain


def test_image_beside_the_class_folders_counts_nowhere(data):
    """Before: train/stray.png was in the fingerprint but no class."""
    plain = fingerprint(data)
    png(data / "train" / "stray.png")
    assert len(load_dataset("imagefolder", data).train) == NINE and fingerprint(data) == plain


# ----------------------------------------------------------------------------- sizes


def test_decompression_bomb_outside_the_probe_is_refused(data, monkeypatch):
    """Before: the in-memory path decoded a test image over PIL's pixel limit with torchvision,
    which has no limit (the streaming path and torchvision's ImageFolder refuse it)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # 200 x 200 = 40,000 pixels: over twice the limit
    bomb = data / "test" / "cat" / "bomb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(bomb)
    assert bomb.stat().st_size > 64 * 2**10
    for keywords in ({}, STREAM):
        with pytest.raises(KDError) as excinfo:
            load_dataset("imagefolder", data, **keywords)
        assert_one_line_kderror(excinfo, str(bomb), "decompression bomb", **SHORT)


def test_huge_file_of_garbage_is_refused_without_reading_it_whole(data, monkeypatch):
    """Before: the in-memory path read all 4 GiB of it into memory before finding it no image."""
    big = data / "test" / "cat" / "big.png"
    with open(big, "wb") as file:
        file.truncate(4 * 2**30)  # sparse: no disk space used
    fromfile = np.fromfile

    def refusing(path, *args, **kwargs):
        assert os.fspath(path) != str(big), f"{big} was read whole"
        return fromfile(path, *args, **kwargs)

    monkeypatch.setattr(np, "fromfile", refusing)
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", data)
    assert_one_line_kderror(excinfo, str(big), "not an image file", **SHORT)


def test_header_only_bomb_is_refused(data):
    """A PNG header that claims 100,000 x 100,000 pixels (already one line before)."""
    bomb = data / "train" / "ant" / "bomb.png"
    buffer = io.BytesIO()
    png(buffer)  # a real 6 x 6 PNG, its IHDR then rewritten
    header = bytearray(buffer.getvalue())
    header[16:24] = (100_000).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    bomb.write_bytes(bytes(header))
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", data)
    assert_one_line_kderror(excinfo, str(bomb), "decompression bomb", **SHORT)


# ----------------------------------------------------------------------------- end to end


def test_kd_refuses_a_fifo_in_one_line_and_writes_nothing(data, tmp_path, no_hang):
    os.mkfifo(data / "train" / "bee" / "x.png")
    out = tmp_path / "run"
    result = kd_in_process("train-teacher", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "tiny_cnn",
                           "--epochs", "1", "--max-steps", "2", "--batch-size", "4", "--out", str(out))
    assert_one_line_error(result, str(data / "train" / "bee" / "x.png"), "FIFO", shorter_than=300)
    assert not out.exists()


def test_resume_notices_a_change_behind_a_linked_class_folder(data, tmp_path):
    shutil.move(data / "train" / "cat", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", data / "train" / "cat")
    out = tmp_path / "run"
    args = ("train-teacher", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "tiny_cnn",
            "--epochs", "1", "--max-steps", "2", "--batch-size", "4", "--checkpoint-every", "1", "--out", str(out))
    assert kd_in_process(*args).returncode == 0
    png(tmp_path / "elsewhere" / "000.png", size=16)  # same name, another image (and size)
    assert_one_line_error(kd_in_process(*args, "--resume"), "--data-dir", shorter_than=300)
