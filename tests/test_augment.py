"""kd.data.augment: each augmentation against an independent expectation, the flags' checks, and the
seeded, reproducible batches DeviceBatches yields with them (in memory and streaming)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.data.augment import (
    AUGMENTATIONS,
    AugmentOptions,
    Cutout,
    StreamingResizedCrop,
    build_pipeline,
    check_augment,
    default_augment,
    makes_soft_labels,
    parse_augment,
)
from kd.data.datasets import DATASET_NAMES, load_dataset
from kd.errors import KDError
from kd.data.loader import DeviceBatches, Normalize
from tests.helpers import FAST, assert_one_line_error, assert_one_line_kderror, kd_in_process, make_image_folder, read_run

CPU = torch.device("cpu")


def identity(images: torch.Tensor) -> torch.Tensor:
    return images.float()


def pipeline(names: tuple[str, ...], seed: int = 0, *, size: int = 10, num_classes: int = 10, **options):
    generator = torch.Generator().manual_seed(seed)
    return build_pipeline(
        AugmentOptions(names, **options), image_size=size, num_classes=num_classes, normalize=identity, generator=generator
    )


def noise(n: int, channels: int = 3, size: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------- names, defaults, checks


def test_parse_augment():
    assert parse_augment("crop,flip") == ("crop", "flip")
    assert parse_augment(" Crop , FLIP,cutmix ") == ("crop", "flip", "cutmix")
    assert parse_augment("none") == () and parse_augment("None") == ()
    for text, needle in (("crop,blur", "'blur'"), ("crop,crop", "twice"), ("none,crop", "none"), ("", "''")):
        with pytest.raises(KDError) as excinfo:
            parse_augment(text)
        assert_one_line_kderror(excinfo, needle, "--augment", *AUGMENTATIONS)


def test_default_augment_per_dataset():
    flips = {"cifar10", "cifar100", "fashionmnist", "imagefolder"}
    for key in DATASET_NAMES:
        assert default_augment(key) == (("crop", "flip") if key in flips else ("crop",)), key
    with pytest.raises(KDError):
        default_augment("imagenet")


@pytest.mark.parametrize(
    "options,flag",
    [
        ({"crop_padding": 0}, "--crop-padding"),
        ({"crop_padding": 32}, "--crop-padding"),
        ({"cutout_size": 0}, "--cutout-size"),
        ({"cutout_size": 33}, "--cutout-size"),
        ({"randaugment_n": 0}, "--randaugment-n"),
        ({"randaugment_m": 31}, "--randaugment-m"),
        ({"randaugment_m": -1}, "--randaugment-m"),
        ({"randaugment_m": 2.5}, "--randaugment-m"),
        ({"mixup_alpha": 0.0}, "--mixup-alpha"),
        ({"cutmix_alpha": -1.0}, "--cutmix-alpha"),
        ({"cutmix_alpha": float("nan")}, "--cutmix-alpha"),
        ({"mix_switch_prob": 1.5}, "--mix-switch-prob"),
    ],
)
def test_check_augment_names_the_flag(options, flag):
    with pytest.raises(KDError) as excinfo:
        check_augment(AugmentOptions(("crop",), **options), 32)
    assert_one_line_kderror(excinfo, flag)


def test_uint8_ops_run_before_the_ones_on_normalised_images_each_group_in_the_order_given():
    options = AugmentOptions(("crop", "flip", "cutout", "randaugment", "mixup", "cutmix"))  # the order
    check_augment(options, 32)
    assert options.applied_order() == ("crop", "flip", "randaugment", "cutout", "mixup", "cutmix")
    assert AugmentOptions(("cutmix", "flip", "cutout", "crop")).applied_order() == ("flip", "crop", "cutmix", "cutout")
    assert options.resolved(32)["applied_order"] == list(options.applied_order())
    with pytest.raises(KDError) as excinfo:
        check_augment(AugmentOptions(("crop", "blur")), 32)
    assert_one_line_kderror(excinfo, "'blur'")


def test_resolved_fills_the_defaults_and_is_json():
    options = AugmentOptions(("crop", "cutout", "mixup"))
    resolved = options.resolved(32)
    assert json.loads(json.dumps(resolved)) == resolved
    assert resolved == {
        "names": ["crop", "cutout", "mixup"], "applied_order": ["crop", "cutout", "mixup"], "crop_padding": 4, "cutout_size": 16, "randaugment_n": 2,
        "randaugment_m": 9, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_switch_prob": 0.5,
    }
    assert [AugmentOptions(()).resolved(size)["crop_padding"] for size in (4, 8, 28, 96)] == [1, 1, 4, 12]
    assert AugmentOptions((), crop_padding=2, cutout_size=5).resolved(8)["cutout_size"] == 5
    streaming = options.resolved(224, streaming=True)
    assert "crop_padding" not in streaming and streaming["crop_scale"] == [0.08, 1.0]
    assert makes_soft_labels(options) and makes_soft_labels(AugmentOptions(("cutmix",)))
    assert not makes_soft_labels(AugmentOptions(("crop", "flip", "cutout", "randaugment")))


# ----------------------------------------------------------------------------- uint8 space


def test_crop_is_a_window_of_the_reflect_padded_image():
    images, labels = noise(48), torch.arange(48)
    out, targets = pipeline(("crop",), seed=3, crop_padding=3)(images, labels)
    assert torch.equal(targets, labels) and out.shape == images.shape
    padded = F.pad(images.float(), (3, 3, 3, 3), mode="reflect")
    offsets = set()
    for i in range(len(images)):
        found = [(dy, dx) for dy in range(7) for dx in range(7) if torch.equal(out[i], padded[i, :, dy : dy + 10, dx : dx + 10])]
        assert found, i
        offsets.update(found)
    assert len(offsets) > 20  # offsets over the whole [0, 2p] x [0, 2p] range, not one
    # The same numbers, drawn directly: top and left offsets of every image, in [0, 2p].
    drawn = torch.randint(0, 7, (2, 48), generator=torch.Generator().manual_seed(3))
    expected = torch.stack([padded[i, :, t : t + 10, l : l + 10] for i, (t, l) in enumerate(drawn.T.tolist())])
    assert torch.equal(out, expected)


def test_flip_mirrors_some_images_and_keeps_the_others():
    images = noise(64)
    out, _ = pipeline(("flip",), seed=1)(images, torch.zeros(64, dtype=torch.long))
    same = [torch.equal(out[i], images[i].float()) for i in range(64)]
    mirrored = [torch.equal(out[i], images[i].flip(-1).float()) for i in range(64)]
    assert all(a != b for a, b in zip(same, mirrored))  # each image exactly one of the two
    assert 16 < sum(mirrored) < 48


def _randaugment_candidates(image: torch.Tensor, magnitude: int) -> list[torch.Tensor]:
    """Every (op, sign) result of torchvision's own RandAugment code on `image` (1 x C x H x W)."""
    from torchvision.transforms.v2 import RandAugment

    reference = RandAugment(magnitude=magnitude)
    space = getattr(reference, "_AUGMENTATION_SPACE", None)
    if space is None or not hasattr(reference, "_apply_image_or_video_transform"):
        pytest.skip("this torchvision has no RandAugment internals to compare with")
    height, width = image.shape[-2:]
    results = []
    for name, (levels, signed) in space.items():
        values = levels(31, height, width)
        level = 0.0 if values is None else float(values[magnitude])
        for value in (level, -level) if signed else (level,):
            results.append(reference._apply_image_or_video_transform(
                image, name, value, interpolation=reference.interpolation, fill=reference._fill))
    return results


def test_randaugment_each_image_draws_its_own_torchvision_op():
    image = noise(1, size=16, seed=5)
    copies = image.expand(96, -1, -1, -1).contiguous()
    out, _ = pipeline(("randaugment",), seed=0, size=16, randaugment_n=1, randaugment_m=9)(copies, torch.zeros(96, dtype=torch.long))
    candidates = _randaugment_candidates(image, 9)
    hit = set()
    for i in range(96):
        matches = [k for k, candidate in enumerate(candidates) if torch.equal(out[i : i + 1], candidate.float())]
        assert matches, f"image {i} is no single torchvision RandAugment op of the input"
        hit.update(matches)
    assert len(hit) >= 12  # many different ops within one batch, not one op for all


def test_randaugment_is_reproducible_from_the_seed():
    images, labels = noise(32, size=12), torch.zeros(32, dtype=torch.long)
    first, _ = pipeline(("randaugment",), seed=7, size=12)(images, labels)
    again, _ = pipeline(("randaugment",), seed=7, size=12)(images, labels)
    other, _ = pipeline(("randaugment",), seed=8, size=12)(images, labels)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({out.numpy().tobytes() for out in first}) > 1


# ----------------------------------------------------------------------------- float space


def test_cutout_zeroes_one_square_clipped_at_the_border():
    side, size = 4, 10
    out, _ = Cutout(side, torch.Generator().manual_seed(0))(torch.ones(200, 3, size, size), torch.zeros(200))
    inside = 0
    for image in out:
        zero = image == 0
        assert torch.equal(zero, zero[:1].expand_as(zero))  # the same square on every channel
        rows, cols = torch.nonzero(zero[0], as_tuple=True)
        assert len(rows) > 0
        top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        assert int(zero[0].sum()) == (bottom - top) * (right - left)  # one solid rectangle
        assert bottom - top == side or top == 0 or bottom == size  # a shorter side touches the border
        assert right - left == side or left == 0 or right == size
        inside += (bottom - top, right - left) == (side, side)
    assert 50 < inside < 200  # centres uniform over the image: some squares are clipped, most are not


def _mix_batch(seed: int, names=("mixup",), **options):
    n = 12
    images = noise(n, seed=seed + 100)
    out, targets = pipeline(names, seed=seed, num_classes=n, **options)(images, torch.arange(n))
    return images.float(), out, targets


def _partner_weights(images: torch.Tensor, out: torch.Tensor) -> list[tuple[int, float]]:
    """For each output image, the (partner j, weight a) with out[i] = a x[i] + (1 - a) x[j]."""
    found = []
    for i in range(len(images)):
        if torch.allclose(out[i], images[i]):
            found.append((i, 1.0))
            continue
        for j in range(len(images)):
            d = (images[i] - images[j]).flatten()
            if j == i or d.norm() == 0:
                continue
            a = float(((out[i] - images[j]).flatten() @ d) / (d @ d))
            if torch.allclose(out[i], a * images[i] + (1 - a) * images[j], atol=1e-3):
                found.append((j, a))
                break
        else:
            raise AssertionError(f"image {i} is no mix of two inputs")
    return found


def test_mixup_labels_use_the_pixels_lam():
    lams = set()
    for seed in range(4):
        images, out, targets = _mix_batch(seed)
        assert targets.dtype == torch.float32 and targets.shape == (12, 12)
        pairs = _partner_weights(images, out)
        batch_lam = [a for (j, a), i in zip(pairs, range(12)) if j != i]
        assert batch_lam and max(batch_lam) - min(batch_lam) < 1e-4  # one lam for the whole batch
        for i, (j, a) in enumerate(pairs):
            expected = torch.zeros(12)
            expected[i] += a
            expected[j] += 1 - a
            assert torch.allclose(targets[i], expected, atol=1e-4)
        lams.add(round(batch_lam[0], 4))
    assert len(lams) == 4 and all(0 < lam < 1 for lam in lams)


def _cutmix_boxes(images: torch.Tensor, out: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Kept fractions of each image (by counting pixels), checked against its target row."""
    kept = []
    for i in range(len(images)):
        changed = (out[i] != images[i]).any(0)  # H x W
        fraction = 1.0 - float(changed.sum()) / changed.numel()
        partner = [j for j in range(len(images)) if j != i and targets[i, j] > 0]
        if partner:  # the box's pixels all come from that one partner
            assert torch.equal(out[i][:, changed], images[partner[0]][:, changed])
            assert math.isclose(float(targets[i, i]), fraction, abs_tol=1e-6)
            assert math.isclose(float(targets[i, partner[0]]), 1.0 - fraction, abs_tol=1e-6)
            kept.append(fraction)
    return kept


def test_cutmix_lam_is_the_kept_area():
    fractions = set()
    for seed in range(6):
        images, out, targets = _mix_batch(seed, ("cutmix",))
        assert torch.allclose(targets.sum(1), torch.ones(12))
        kept = _cutmix_boxes(images, out, targets)
        assert kept and max(kept) - min(kept) < 1e-9  # one box for the batch
        fractions.add(kept[0])
    assert len(fractions) > 3


def test_mixup_and_cutmix_switch_per_batch():
    def is_cutmix(seed: int, prob: float) -> bool:
        """CutMix copies whole pixels (integer values here); Mixup blends them (fractions)."""
        _, out, _ = _mix_batch(seed, ("mixup", "cutmix"), mix_switch_prob=prob)
        return torch.equal(out, out.round())

    assert all(is_cutmix(seed, 1.0) for seed in range(4))
    assert not any(is_cutmix(seed, 0.0) for seed in range(4))
    assert 0 < sum(is_cutmix(seed, 0.5) for seed in range(12)) < 12


def test_no_global_random_state_is_touched():
    torch.manual_seed(0)
    np.random.seed(0)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    names = ("crop", "flip", "randaugment", "cutout", "mixup", "cutmix")
    pipeline(names, size=10)(noise(16), torch.arange(16) % 10)
    assert torch.equal(torch.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], numpy_state)


# ----------------------------------------------------------------------------- DeviceBatches


ALL = AugmentOptions(("crop", "flip", "randaugment", "cutout", "mixup", "cutmix"), randaugment_n=1)


def _epoch(batches: DeviceBatches, epoch: int = 0, start_batch: int = 0) -> list:
    batches.set_epoch(epoch, start_batch)
    return list(batches)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


def test_device_batches_are_reproducible_and_resume_bitwise():
    data = load_dataset("digits")
    make = lambda seed: DeviceBatches(data, "train", 256, CPU, seed=seed, augment=ALL)
    first, again = make(0), make(0)
    one, two = _epoch(first), _epoch(again)
    assert _same(one, two) and not _same(one, _epoch(make(1)))
    images, targets, valid, _ = one[0]
    assert images.dtype == torch.float32 and targets.shape == (256, 10) and valid.all()
    # Resume: the generator state after batch 0 and start_batch=1 give the rest of the epoch.
    resumed = make(0)
    _epoch(resumed)  # some other history first
    state = make(0)
    state.set_epoch(0, 0, 1)
    list(state)
    resumed.generator.set_state(state.generator.get_state())
    assert _same(_epoch(resumed, 0, start_batch=1), one[1:])


def test_device_batches_default_and_evaluation():
    data = load_dataset("digits")
    train = DeviceBatches(data, "train", 64, CPU)
    assert train.augment_options == AugmentOptions(("crop",)) and train.augment.names == ("crop",)
    images, labels, _, _ = next(iter(train))
    assert labels.dtype == torch.long and labels.shape == (64,)
    plain = DeviceBatches(data, "train", 64, CPU, augment=AugmentOptions(()))
    normalize = Normalize(data.mean, data.std, CPU)
    chosen = data.train.images[plain._indices()[0][:64]]
    assert torch.equal(next(iter(plain))[0], normalize(chosen))  # "none": normalisation only
    evaluation = DeviceBatches(data, "test", 100, CPU, augment=ALL)  # augmentations never touch evaluation
    images, labels, _, _ = next(iter(evaluation))
    assert evaluation.augment is None and labels.shape == (100,)
    assert torch.equal(images, normalize(data.test.images[:100]))


@pytest.fixture(scope="module")
def streaming(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("stream"), per_class=4, size=20)
    data = load_dataset("imagefolder", root, max_in_memory_bytes=1)
    assert not data.in_memory
    return data


def test_streaming_crop_is_seeded_by_seed_epoch_and_index(streaming):
    make = lambda seed: DeviceBatches(streaming, "train", 4, CPU, seed=seed, num_workers=0,
                                      augment=AugmentOptions(("crop", "flip", "cutout")))
    assert make(0).augment.names == ("crop", "flip", "cutout") and len(make(0).augment.uint8_ops) == 1  # flip only
    first = _epoch(make(0))
    assert _same(first, _epoch(make(0))) and not _same(first, _epoch(make(1)))
    assert not _same(first, _epoch(make(0), epoch=1))
    crop = StreamingResizedCrop(20, seed=0, epoch=0)
    boxes = [crop.box(40, 30, index) for index in range(200)]
    assert boxes == [StreamingResizedCrop(20, seed=0, epoch=0).box(40, 30, index) for index in range(200)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40
        assert 0.08 * 1200 - 40 <= h * w <= 1200 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    assert len(set(boxes)) > 150


def test_streaming_without_crop_trains_on_the_evaluation_view(streaming):
    batches = DeviceBatches(streaming, "train", 4, CPU, num_workers=0, augment=AugmentOptions(()))
    indices = batches._indices()[0][:4].tolist()
    images, labels, _, positions = next(iter(batches))
    normalize = Normalize(streaming.mean, streaming.std, CPU)
    expected = torch.stack([streaming.train[i][0] for i in indices])
    assert torch.equal(images, normalize(expected)) and labels.tolist() == [streaming.train[i][1] for i in indices]
    assert positions.tolist() == indices  # the sample indices stored soft labels are looked up by


# ----------------------------------------------------------------------------- through the command line


def test_augment_flags_are_recorded_resolved_and_soft_labels_train_every_method_that_takes_them(tmp_path, digits_teacher):
    soft = ["--augment", "crop,cutout,mixup,cutmix", "--mixup-alpha", "0.4"]
    teacher = tmp_path / "lspp"
    result = kd_in_process("train-teacher", "--out", str(teacher), *soft, *FAST)
    assert result.returncode == 0, result.stderr
    config, metrics = read_run(teacher)
    assert config["augment"] == ["crop", "cutout", "mixup", "cutmix"]
    assert config["augment_options"]["mixup_alpha"] == 0.4 and config["augment_options"]["crop_padding"] == 1  # 8 px / 8
    assert set(metrics["epoch_loss_parts"]) == {"loss", "network", "cmatrix"}
    for args in (["--proxy", str(teacher / "cmatrix.safetensors")], ["--teacher", str(digits_teacher)], ["--method", "ls"]):
        out = tmp_path / args[0].strip("-")
        result = kd_in_process("distill", *args, "--model", "tiny_cnn", "--out", str(out), *soft, *FAST)
        assert result.returncode == 0, (args, result.stderr)
        assert read_run(out)[0]["augment"] == ["crop", "cutout", "mixup", "cutmix"]
    default = tmp_path / "default"
    assert kd_in_process("distill", "--model", "tiny_cnn", "--out", str(default), *FAST).returncode == 0
    assert read_run(default)[0]["augment"] == ["crop"]  # digits: no flip


def test_bad_augment_flags_are_one_line_before_any_data_is_read(tmp_path):
    out = str(tmp_path / "run")
    missing = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nowhere")]  # would fail if data were read
    for args, fragment in (
        (["--augment", "crop,blur"], "'blur'"),
        (["--augment", "mixup", "--mixup-alpha", "0"], "--mixup-alpha"),
        (["--augment", "mixup", "--method", "focal"], "--method focal"),
        (["--augment", "cutmix", "--method", "ols"], "label distributions"),
    ):
        assert_one_line_error(kd_in_process("train-teacher", *missing, "--out", out, *args, *FAST), fragment)
    assert not (tmp_path / "run").exists()


def test_a_streamed_folder_trains_with_augmentations_through_the_cli(tmp_path):
    data = make_image_folder(tmp_path / "data", size=72)  # larger than 64 px: streamed through DataLoader workers
    out = tmp_path / "run"
    result = kd_in_process("train-teacher", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "tiny_cnn",
                           "--augment", "crop,flip,cutout,mixup", "--epochs", "1", "--max-steps", "2", "--batch-size", "4",
                           "--out", str(out))
    assert result.returncode == 0, result.stderr
    config, _ = read_run(out)
    assert config["augment_options"]["crop"] == "random_resized" and config["augment"] == ["crop", "flip", "cutout", "mixup"]
