"""kd.data.datasets (and kd.data.imagefolder, kd.data.decode, kd.data.splits): every dataset name to class names plus in-memory uint8 tensors or a streaming Dataset."""

from __future__ import annotations

import pickle
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kd.data.datasets as kdd
import kd.data.decode as decode
import kd.data.imagefolder as imagefolder
from kd.data.datasets import DATASET_NAMES, ImageDataset, InMemorySplit, load_dataset
from kd.errors import KDError
from tests.helpers import assert_one_line_kderror, extract_cifar10_subset, make_image_folder, make_tree, write_image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def no_network(monkeypatch):
    """Fail any connection attempt, and record that it was made."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_values_and_description():
    data = load_dataset("digits")
    assert isinstance(data, ImageDataset) and data.in_memory
    assert isinstance(data.train, InMemorySplit) and isinstance(data.test, InMemorySplit)
    assert data.train.images.shape == (1437, 1, 8, 8) and data.test.images.shape == (360, 1, 8, 8)
    assert data.train.images.dtype == torch.uint8 and data.train.images.is_contiguous()
    assert data.train.labels.dtype == torch.int64 and data.test.labels.shape == (360,)
    assert data.class_names == [str(d) for d in range(10)] and data.num_classes == 10
    assert (data.channels, data.image_size, data.default_augment) == (1, 8, ("crop",))
    assert int(torch.cat([data.train.images, data.test.images]).max()) == 255
    assert int(data.train.images.min()) == 0
    description = data.describe()
    assert "\n" not in description
    for part in ("digits", "10", "1437", "360", "1x8x8", "in memory"):
        assert part in description


def test_digits_split_is_the_stratified_sklearn_split_and_deterministic():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data, again = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(data.train.images, again.train.images) and torch.equal(data.test.labels, again.test.labels)

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    expected = np.rint(x_test * 255 / 16).astype(np.uint8)
    assert np.array_equal(data.test.images[:, 0].numpy(), expected)
    assert np.array_equal(data.train.labels.numpy(), y_train) and np.array_equal(data.test.labels.numpy(), y_test)
    # stratified: every class keeps its share of the test split (within one image)
    totals = np.bincount(digits.target, minlength=10)
    test_counts = np.bincount(data.test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * totals) <= 1)


def test_digits_mean_std_are_computed_from_training_images():
    data = load_dataset("digits")
    pixels = data.train.images.double() / 255
    assert data.mean == pytest.approx((pixels.mean().item(),), abs=1e-9)
    assert data.std == pytest.approx((pixels.std(unbiased=False).item(),), abs=1e-9)


def test_digits_resized_on_request():
    data = load_dataset("digits", image_size=16)
    assert data.train.images.shape == (1437, 1, 16, 16) and data.image_size == 16
    assert data.default_augment == ("crop",)
    with pytest.raises(KDError) as excinfo:
        load_dataset("digits", image_size=64, max_in_memory_bytes=1000)
    assert_one_line_kderror(excinfo, "digits", "--image-size")


def test_unknown_name_lists_valid_names():
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagenet21k")
    assert_one_line_kderror(excinfo, "imagenet21k", *DATASET_NAMES)


def test_names_are_case_and_dash_insensitive():
    assert load_dataset("Digits").name == "digits"
    with pytest.raises(KDError) as excinfo:
        load_dataset("Fashion-MNIST")  # resolves to fashionmnist, which needs a directory
    assert_one_line_kderror(excinfo, "--data-dir")


# ----------------------------------------------------------------------------- imagefolder, in memory


def test_imagefolder_rgb_labels_follow_sorted_folder_names(tmp_path):
    values = make_tree(tmp_path / "pets")
    data = load_dataset("imagefolder", tmp_path / "pets")
    assert data.name == "imagefolder:pets" and data.in_memory
    assert data.class_names == ["ant", "bee", "cat"]
    assert (data.channels, data.image_size, data.default_augment) == (3, 6, ("crop", "flip"))
    assert data.train.images.shape == (9, 3, 6, 6) and data.test.images.shape == (9, 3, 6, 6)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    for split in (data.train, data.test):
        for image, label in zip(split.images, split.labels):
            assert int(image[0, 3, 3]) == values[data.class_names[int(label)]]
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_imagefolder_mean_std_match_the_training_pixels(tmp_path):
    make_tree(tmp_path)
    data = load_dataset("imagefolder", tmp_path)
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "train").rglob("*.png"))]) / 255.0
    assert data.mean == pytest.approx(tuple(pixels.mean(axis=(0, 1, 2))), abs=1e-9)
    assert data.std == pytest.approx(tuple(pixels.std(axis=(0, 1, 2))), abs=1e-9)
    assert all(0 < m < 1 for m in data.mean) and all(0 < s < 0.5 for s in data.std)


def test_imagefolder_grayscale_gives_one_channel(tmp_path):
    values = make_tree(tmp_path, mode="L")
    data = load_dataset("imagefolder", tmp_path)
    assert data.channels == 1 and data.train.images.shape == (9, 1, 6, 6)
    assert len(data.mean) == 1 and len(data.std) == 1
    assert int(data.train.images[0, 0, 3, 3]) == values["ant"]


def test_imagefolder_val_is_accepted_without_test(tmp_path):
    make_tree(tmp_path, test_name="val")
    data = load_dataset("imagefolder", tmp_path)
    assert len(data.test) == 9 and data.class_names == ["ant", "bee", "cat"]


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_imagefolder_rgba_and_palette_become_rgb(tmp_path, mode):
    for split in ("train", "test"):
        for name in ("a", "b"):
            image = Image.new("RGB", (5, 5), (200, 100, 50)).convert(mode)
            path = tmp_path / split / name / "x.png"
            path.parent.mkdir(parents=True)
            image.save(path)
    data = load_dataset("imagefolder", tmp_path)
    assert data.channels == 3 and data.train.images.shape == (2, 3, 5, 5)
    expected = np.asarray(Image.open(tmp_path / "train" / "a" / "x.png").convert("RGB"))  # P: a web-palette colour
    assert data.train.images[0].permute(1, 2, 0).numpy().tolist() == expected.tolist()
    assert abs(int(data.train.images[0, 0, 2, 2]) - 200) <= 5 and abs(int(data.train.images[0, 2, 2, 2]) - 50) <= 5


def test_imagefolder_sixteen_bit_gray_is_one_channel_scaled_to_8_bits(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            path = tmp_path / split / name / "x.png"
            path.parent.mkdir(parents=True)
            pixels = np.full((4, 4), 128 * 257, dtype=np.uint16)
            pixels[0, 0] = 65535
            Image.fromarray(pixels).save(path)
    data = load_dataset("imagefolder", tmp_path)
    assert data.channels == 1 and data.train.images.shape == (2, 1, 4, 4)
    assert int(data.train.images[0, 0, 2, 2]) == 128 and int(data.train.images[0, 0, 0, 0]) == 255


def test_imagefolder_geometry_is_decided_by_the_whole_dataset_not_the_first_image(tmp_path):
    for split in ("train", "test"):
        write_image(tmp_path / split / "a" / "0.png", np.full((6, 10), 90, np.uint8), "L")  # first: gray 10x6
        for i in range(1, 4):
            write_image(tmp_path / split / "a" / f"{i}.png", np.full((8, 8, 3), 60, np.uint8))
        for i in range(3):
            write_image(tmp_path / split / "b" / f"{i}.png", np.full((8, 8, 3), 170, np.uint8))
        write_image(tmp_path / split / "b" / "3.png", np.full((20, 20, 3), 200, np.uint8))
    data = load_dataset("imagefolder", tmp_path)
    assert (data.channels, data.image_size, data.in_memory) == (3, 8, True)  # the most common size; colour
    assert data.train.images.shape == (8, 3, 8, 8) and data.test.images.shape == (8, 3, 8, 8)
    gray = data.train.images[0]  # the gray image, converted to RGB and resized
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and int(gray[0, 4, 4]) == 90
    assert int(data.train.images[7].min()) == 200  # the 20x20 one, resized
    (note,) = data.notes
    assert "\n" not in note and len(note) < 300
    for part in ("all 8", "3 sizes", "most common 8x8 (6 images)", "resized to 8x8", "1 grayscale and 7 colour"):
        assert part in note, (part, note)

    smaller = load_dataset("imagefolder", tmp_path, image_size=4)  # --image-size overrides the size
    assert smaller.train.images.shape == (8, 3, 4, 4) and smaller.in_memory and "resized to 4x4" in smaller.notes[0]

    streamed = load_dataset("imagefolder", tmp_path, max_in_memory_bytes=1)  # the same geometry, streaming
    assert (streamed.channels, streamed.image_size, streamed.in_memory) == (3, 8, False)
    assert "3 sizes" in streamed.notes[0]
    for index in (0, 7):  # the gray one and the large one
        image, _ = streamed.test[index]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 8, 8)


def test_imagefolder_colour_in_a_later_class_makes_the_dataset_rgb(tmp_path):
    for split in ("train", "test"):
        for i in range(3):
            write_image(tmp_path / split / "a" / f"{i}.png", np.full((5, 5), 80, np.uint8), "L")
            write_image(tmp_path / split / "b" / f"{i}.png", np.full((5, 5, 3), (200, 10, 10), np.uint8))
    data = load_dataset("imagefolder", tmp_path)
    assert data.channels == 3 and data.train.images.shape == (6, 3, 5, 5)
    assert data.train.images[5, :, 2, 2].tolist() == [200, 10, 10]
    assert "3 grayscale and 3 colour" in data.notes[0] and "sizes" not in data.notes[0]


def test_uniform_imagefolder_has_no_notes(tmp_path):
    make_tree(tmp_path)
    data = load_dataset("imagefolder", tmp_path)
    assert data.notes == () and data.skipped_images == 0


def test_probe_is_spread_over_the_classes(tmp_path, monkeypatch):
    samples = [(f"{label}/{i}", label) for label, count in enumerate((500, 3, 97, 1)) for i in range(count)]
    picked = imagefolder._spread(samples, 40)
    assert picked == imagefolder._spread(samples, 40) and picked == sorted(picked)  # deterministic, in order
    per_class = [sum(samples[i][1] == label for i in picked) for label in range(4)]
    assert per_class == [10, 3, 10, 1]
    assert [i for i in picked if samples[i][1] == 0] == list(range(0, 500, 50))  # evenly spaced
    assert imagefolder._spread(samples[:30], 40) == list(range(30))  # all when there are few

    make_tree(tmp_path, per_class=4)
    write_image(tmp_path / "train" / "cat" / "002.png", np.full((9, 9, 3), 1, np.uint8))  # probed: 000 and 002
    monkeypatch.setattr(imagefolder, "_PROBE_FILES", 6)
    data = load_dataset("imagefolder", tmp_path)
    assert data.image_size == 6 and "6 of 12, spread over the classes" in data.notes[0]


def test_parallel_decoding_matches_single_chunk(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("a", "b", "c"):
            for i in range(7):
                write_image(tmp_path / split / name / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    whole = load_dataset("imagefolder", tmp_path)
    monkeypatch.setattr(decode, "_MIN_CHUNK", 2)
    monkeypatch.setattr(decode, "_MAX_CHUNK", 2)  # 11 chunks: DataLoader worker processes do the decoding
    chunked = load_dataset("imagefolder", tmp_path)
    assert torch.equal(whole.train.images, chunked.train.images)
    assert torch.equal(whole.test.labels, chunked.test.labels)


# ----------------------------------------------------------------------------- real data: CIFAR-10 JPEGs


@pytest.fixture(scope="module")
def cifar10_small(tmp_path_factory) -> Path:
    """The first 10 train and 5 test images of every class of the shared CIFAR-10 JPEG zip."""
    return extract_cifar10_subset(tmp_path_factory.mktemp("cifar10"), train_per_class=10, test_per_class=5)


def test_cifar10_jpeg_subset_matches_pil(cifar10_small, monkeypatch):
    monkeypatch.setattr(decode, "_MIN_CHUNK", 16)
    monkeypatch.setattr(decode, "_MAX_CHUNK", 16)  # several chunks, so worker processes take part
    data = load_dataset("imagefolder", cifar10_small)
    assert data.class_names == CIFAR10_CLASSES
    assert (data.channels, data.image_size, data.in_memory, data.default_augment) == (3, 32, True, ("crop", "flip"))
    assert data.train.images.shape == (100, 3, 32, 32) and data.test.images.shape == (50, 3, 32, 32)
    assert torch.bincount(data.train.labels).tolist() == [10] * 10
    files = [p for c in CIFAR10_CLASSES for p in sorted((cifar10_small / "train" / c).iterdir())]
    for index in range(0, 100, 7):
        expected = torch.from_numpy(np.array(Image.open(files[index]).convert("RGB"))).permute(2, 0, 1)
        assert int(data.train.labels[index]) == CIFAR10_CLASSES.index(files[index].parent.name)
        assert (data.train.images[index].float() - expected.float()).abs().mean() < 2
    assert all(0.3 < m < 0.7 for m in data.mean) and all(0.15 < s < 0.35 for s in data.std)


def test_cifar10_jpeg_subset_streams(cifar10_small):
    data = load_dataset("imagefolder", cifar10_small, image_size=96)
    assert not data.in_memory and data.image_size == 96 and len(data.train) == 100 and len(data.test) == 50
    image, label = data.test[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 96, 96) and label == 0


# ----------------------------------------------------------------------------- imagefolder, streaming


def test_streaming_when_over_the_memory_limit(tmp_path):
    values = make_tree(tmp_path, size=10)
    data = load_dataset("imagefolder", tmp_path, max_in_memory_bytes=100)
    assert not data.in_memory and isinstance(data.train, torch.utils.data.Dataset)
    assert (data.default_augment, data.mean, data.std) == (("crop", "flip"), kdd.IMAGENET_MEAN, kdd.IMAGENET_STD)
    assert len(data.train) == 9 and len(data.test) == 9 and data.num_classes == 3
    for split in (data.train, data.test):
        image, label = split[4]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 10, 10) and isinstance(label, int)
        assert data.class_names[label] == "bee" and int(image[:, 5, 5].min()) >= values["bee"] - 10
    assert "streaming" in data.describe()
    clone = pickle.loads(pickle.dumps(data.train))  # DataLoader workers started by spawn need this
    assert clone[0][0].shape == (3, 10, 10)


def test_streaming_when_larger_than_64_and_grayscale(tmp_path):
    make_tree(tmp_path, mode="L", size=8)
    data = load_dataset("imagefolder", tmp_path, image_size=72)
    assert not data.in_memory and data.image_size == 72 and data.channels == 1
    assert (data.mean, data.std) == (kdd.GRAY_MEAN, kdd.GRAY_STD)
    for split in (data.train, data.test):
        image, _ = split[0]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (1, 72, 72)


def test_streaming_corrupt_image_is_named_before_training(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "train" / "cat" / "zzz.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path, max_in_memory_bytes=1)  # every header is checked up front
    assert_one_line_kderror(excinfo, "cannot read image", str(bad))


def test_streaming_item_that_fails_to_decode_is_named(tmp_path, monkeypatch):
    make_tree(tmp_path)
    data = load_dataset("imagefolder", tmp_path, max_in_memory_bytes=1)
    path = data.train.samples[4][0]

    def broken(image):
        raise ValueError("decoder exploded\n  with a second line")

    monkeypatch.setattr(data.train, "transform", broken)
    with pytest.raises(KDError) as excinfo:
        data.train[4]
    assert str(excinfo.value) == f"cannot read image {path}: decoder exploded with a second line"


# ----------------------------------------------------------------------------- imagefolder errors


def test_error_directory_not_found(tmp_path):
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path / "nowhere")
    assert_one_line_kderror(excinfo, "data directory not found", "nowhere")


def test_error_no_directory_given():
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder")
    assert_one_line_kderror(excinfo, "imagefolder", "--data-dir")


def test_error_directory_empty(tmp_path):
    (tmp_path / "hollow").mkdir()
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path / "hollow")
    assert_one_line_kderror(excinfo, "empty", "hollow")


def test_error_missing_train(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "train").rename(tmp_path / "training")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    assert_one_line_kderror(excinfo, "train/", str(tmp_path))


def test_error_missing_test_and_val(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "test").rename(tmp_path / "holdout")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    assert_one_line_kderror(excinfo, "test/", "val/", str(tmp_path))


def test_error_no_class_folders(tmp_path):
    make_tree(tmp_path)
    for folder in (tmp_path / "train").iterdir():
        folder.rename(tmp_path / f"moved-{folder.name}")
    (tmp_path / "train" / "loose.png").write_bytes(b"x")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    assert_one_line_kderror(excinfo, "no class folders", str(tmp_path / "train"))


def test_error_class_folder_without_images(tmp_path):
    make_tree(tmp_path)
    for image in (tmp_path / "test" / "bee").iterdir():
        image.unlink()
    (tmp_path / "test" / "bee" / "notes.txt").write_text("no images here")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    assert_one_line_kderror(excinfo, "no images", str(tmp_path / "test" / "bee"))


def test_error_class_sets_differ(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "test" / "bee").rename(tmp_path / "test" / "wasp")
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    message = assert_one_line_kderror(excinfo, "bee", "wasp", "differ")
    assert "ant" not in message and "cat" not in message  # only what differs is named


@pytest.mark.parametrize("relative", ["ant/000.png", "bee/zzz.png"])  # the first image (probed), a later one
def test_error_corrupt_image_names_the_file(tmp_path, monkeypatch, relative):
    make_tree(tmp_path)
    (tmp_path / "train" / relative).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    monkeypatch.setattr(decode, "_MIN_CHUNK", 2)
    monkeypatch.setattr(decode, "_MAX_CHUNK", 2)  # decoded by worker processes
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    assert_one_line_kderror(excinfo, "cannot read image", str(tmp_path / "train" / relative))


def test_error_truncated_jpeg_names_the_file(tmp_path):
    make_tree(tmp_path)
    buffer = tmp_path / "full.jpg"
    Image.fromarray(np.full((6, 6, 3), 99, np.uint8)).save(buffer, quality=90)
    (tmp_path / "test" / "cat" / "short.jpg").write_bytes(buffer.read_bytes()[:-40])
    buffer.unlink()
    with pytest.raises(KDError) as excinfo:
        load_dataset("imagefolder", tmp_path)
    assert_one_line_kderror(excinfo, "short.jpg")


def test_error_bad_image_size(tmp_path):
    with pytest.raises(KDError) as excinfo:
        load_dataset("digits", image_size=0)
    assert_one_line_kderror(excinfo, "image size")


# ----------------------------------------------------------------------------- torchvision datasets


TORCHVISION_NAMES = [("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"), ("mnist", "MNIST"),
                     ("fashionmnist", "Fashion-MNIST"), ("svhn", "SVHN")]


@pytest.mark.parametrize("name,display", TORCHVISION_NAMES)
def test_torchvision_dataset_without_data_dir(name, display):
    with pytest.raises(KDError) as excinfo:
        load_dataset(name)
    assert_one_line_kderror(excinfo, "--data-dir", name)


@pytest.mark.parametrize("name,display", TORCHVISION_NAMES)
def test_torchvision_dataset_missing_without_download(tmp_path, no_network, name, display):
    with pytest.raises(KDError) as excinfo:
        load_dataset(name, tmp_path / "data", download=False)
    message = assert_one_line_kderror(excinfo, f"no {display} data under", str(tmp_path / "data"), "--download")
    assert message.endswith("point --data-dir at it")
    assert no_network == []  # nothing tried to connect
    assert not (tmp_path / "data").exists()


def test_torchvision_download_failure_is_one_line(tmp_path, no_network):
    with pytest.raises(KDError) as excinfo:
        load_dataset("mnist", tmp_path, download=True)
    assert_one_line_kderror(excinfo, "could not download MNIST", str(tmp_path))
    assert no_network  # it did try (and was refused)


def _write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(
    "name,folder,augment", [("mnist", "MNIST", ("crop",)), ("fashionmnist", "FashionMNIST", ("crop", "flip"))]
)
def test_mnist_style_files_load_as_n_1_28_28(tmp_path, name, folder, augment):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = load_dataset(name, tmp_path)
    assert data.train.images.shape == (30, 1, 28, 28) and data.test.images.shape == (10, 1, 28, 28)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.tolist() == [i % 10 for i in range(30)]
    assert (data.channels, data.image_size, data.default_augment, data.num_classes) == (1, 28, augment, 10)
    assert data.train.images.is_contiguous()


class _FakeCifar:
    classes = ["c0", "c1"]

    def __init__(self, root, train=True, download=False):
        n = 4 if train else 2
        self.data = np.zeros((n, 32, 32, 3), dtype=np.uint8)  # N x H x W x C, like torchvision's CIFAR
        self.data[:, 1, 2, 0] = 200  # red channel of row 1, column 2
        self.targets = [i % 2 for i in range(n)]


class _FakeSvhn:
    def __init__(self, root, split="train", download=False):
        n = 5 if split == "train" else 3
        self.data = np.zeros((n, 3, 32, 32), dtype=np.uint8)  # N x C x H x W, like torchvision's SVHN
        self.data[:, 2, 1, 2] = 77
        self.labels = np.arange(n) % 10


def test_cifar_layout_is_converted_to_nchw(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCifar)
    data = load_dataset("cifar10", tmp_path)
    assert data.train.images.shape == (4, 3, 32, 32) and data.train.images.is_contiguous()
    assert int(data.train.images[0, 0, 1, 2]) == 200 and int(data.train.images[0, 1:].max()) == 0
    assert data.class_names == ["c0", "c1"] and data.default_augment == ("crop", "flip")


def test_svhn_uses_labels_and_digit_names(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "SVHN", _FakeSvhn)
    data = load_dataset("svhn", tmp_path)
    assert data.train.images.shape == (5, 3, 32, 32) and data.test.images.shape == (3, 3, 32, 32)
    assert int(data.train.images[0, 2, 1, 2]) == 77 and data.train.labels.dtype == torch.int64
    assert data.class_names == [str(d) for d in range(10)] and data.default_augment == ("crop",)


def test_train_per_class_is_a_seeded_stratified_subset(tmp_path):
    from kd.data.splits import train_per_class

    data = load_dataset("digits")
    small = train_per_class(data, 5, seed=0)
    assert torch.bincount(small.train.labels, minlength=10).tolist() == [5] * 10
    assert len(small.test) == len(data.test) and "5 images per class" in small.notes[-1]
    # Each picked image is one of the originals with its own label.
    originals = {bytes(image.numpy()): int(label) for image, label in zip(data.train.images, data.train.labels)}
    assert all(originals[bytes(image.numpy())] == int(label) for image, label in zip(small.train.images, small.train.labels))
    assert torch.equal(train_per_class(data, 5, seed=0).train.images, small.train.images)
    assert not torch.equal(train_per_class(data, 5, seed=1).train.images, small.train.images)
    with pytest.raises(KDError, match="--train-per-class 1000: class '0' has only"):
        train_per_class(data, 1000, seed=0)
    streamed = load_dataset("imagefolder", make_image_folder(tmp_path / "big", per_class=6, size=72))
    assert not streamed.in_memory
    picked = train_per_class(streamed, 2, seed=0).train
    assert sorted(picked.targets) == [0, 0, 1, 1, 2, 2] and len(picked) == 6 and picked[0][0].shape[-1] == streamed.image_size
