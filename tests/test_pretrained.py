"""Pretrained timm / torchvision teachers: the input adapter, `kd distill --teacher-model` and
`kd cmatrix from-teacher --teacher-model`, checked against computations made here, and their bad input.

The teacher is timm's `test_resnet` (0.37M parameters) with random weights saved by the test,
seen at 16 px so each run takes seconds.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision.transforms.functional as TF
from safetensors.torch import save_file

from kd.cmatrix.artifact import load_cmatrix
from kd.data.datasets import IMAGENET_MEAN, IMAGENET_STD, load_dataset
from kd.models.pretrained import InputConfig, ModelSpec, TeacherInput, parse_teacher_model, teacher_input_config
from tests.helpers import DIGITS, FAST, SHORT_ERROR, assert_one_line_error, kd_in_process, read_run, sha256

MODEL = "test_resnet"
SIZE = 16  # --teacher-image-size: the teacher's native 160 px would cost 100x the compute


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """Weights files of one randomly initialised 10-class test_resnet, and of a 3-class one."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    net = timm.create_model(MODEL, num_classes=10).eval()
    files = {
        "net": net,
        "safetensors": folder / "teacher.safetensors",
        "checkpoint": folder / "teacher.pt",
        "renamed": folder / "renamed.safetensors",
        "three": folder / "three.safetensors",
    }
    state = net.state_dict()
    save_file(state, str(files["safetensors"]), metadata={"class_names": json.dumps(DIGITS)})
    torch.save({"state_dict": state, "epoch": 7}, files["checkpoint"])  # a training checkpoint dict
    save_file(state, str(files["renamed"]), metadata={"class_names": json.dumps([f"digit-{d}" for d in DIGITS])})
    save_file(timm.create_model(MODEL, num_classes=3).state_dict(), str(files["three"]))
    return files


def test_model_names_and_their_input_config():
    assert parse_teacher_model("resnet18") == ModelSpec("timm", "resnet18")  # bare: timm first
    assert parse_teacher_model("tv:resnet18") == ModelSpec("torchvision", "resnet18")
    assert parse_teacher_model("torchvision:squeezenet1_1").display == "tv:squeezenet1_1"
    assert parse_teacher_model("squeezenet1_1") == ModelSpec("torchvision", "squeezenet1_1")  # not a timm name
    timm_config = teacher_input_config(ModelSpec("timm", MODEL))  # timm's pretrained_cfg
    assert timm_config == InputConfig(3, (160, 160), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    tv_config = teacher_input_config(ModelSpec("torchvision", "efficientnet_b3"))  # its weights' transforms
    assert tv_config == InputConfig(3, (300, 300), IMAGENET_MEAN, IMAGENET_STD)
    assert teacher_input_config(ModelSpec("torchvision", "resnet18"), image_size=32).size == (32, 32)


@pytest.mark.parametrize("data_channels,teacher_channels,size", [(1, 3, 16), (3, 3, 5), (3, 1, 8), (1, 3, 8)])
def test_adapter_equals_hand_computed_denormalise_resize_renormalise(data_channels, teacher_channels, size):
    generator = torch.Generator().manual_seed(data_channels * 10 + size)
    data_mean = torch.rand(data_channels, generator=generator).tolist()
    data_std = (torch.rand(data_channels, generator=generator) + 0.2).tolist()
    teacher = InputConfig(teacher_channels, (size, size), (0.485, 0.456, 0.406)[:teacher_channels], (0.229, 0.224, 0.225)[:teacher_channels])
    batch = torch.randn(4, data_channels, 8, 8, generator=generator)

    pixels = torch.stack([TF.normalize(image, [-m / s for m, s in zip(data_mean, data_std)], [1 / s for s in data_std]) for image in batch])
    if size != 8:
        pixels = TF.resize(pixels, [size, size], antialias=True)
    if data_channels == 1 and teacher_channels == 3:
        pixels = pixels.repeat(1, 3, 1, 1)
    elif data_channels == 3 and teacher_channels == 1:
        pixels = 0.299 * pixels[:, :1] + 0.587 * pixels[:, 1:2] + 0.114 * pixels[:, 2:]
    expected = TF.normalize(pixels, list(teacher.mean), list(teacher.std))

    adapted = TeacherInput(data_mean, data_std, teacher)(batch)
    assert adapted.shape == (4, teacher_channels, size, size)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-5)


def test_distill_from_a_pretrained_teacher_records_it(tmp_path, weights):
    out = tmp_path / "student"
    result = kd_in_process(
        "distill", "--teacher-model", MODEL, "--teacher-weights", str(weights["safetensors"]),
        "--teacher-image-size", str(SIZE), "--model", "tiny_cnn", "--out", str(out), *FAST,
    )
    assert result.returncode == 0, result.stderr
    config, metrics = read_run(out)
    assert config["method"] == metrics["method"] == "kd" and config["mode"] == "kd" and config["teacher"] is None
    assert config["teacher_model"] == f"timm:{MODEL}"
    assert config["teacher_weights"] == str(weights["safetensors"].resolve())
    assert config["teacher_weights_sha256"] == sha256(weights["safetensors"])
    assert config["teacher_input"] == {"channels": 3, "size": [SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3}
    assert metrics["target_source"] == f"teacher timm:{MODEL} (per sample)"
    assert 0.0 < metrics["teacher_forward_share"] <= 1.0


@torch.no_grad()
def independent_posthoc(net: torch.nn.Module) -> torch.Tensor:
    """The posthoc C-matrix of `net` over the digits training split, computed here from its outputs."""
    data = load_dataset("digits")
    mean, std = data.mean[0], data.std[0]
    images = (data.train.images.float() / 255.0 - mean) / std  # what the data layer feeds the student
    pixels = TF.resize(images * std + mean, [SIZE, SIZE], antialias=True).repeat(1, 3, 1, 1)
    probs = torch.softmax(net(TF.normalize(pixels, [0.5] * 3, [0.5] * 3)).double(), dim=1)
    labels = data.train.labels
    probs[torch.arange(len(labels)), labels] = 0.0
    probs /= probs.sum(dim=1, keepdim=True)
    rows = torch.stack([probs[labels == k].mean(dim=0) for k in range(10)])
    rows.fill_diagonal_(0.0)
    return rows / rows.sum(dim=1, keepdim=True)


def test_posthoc_cmatrix_from_a_pretrained_teacher_equals_one_computed_here(tmp_path, weights):
    out = tmp_path / "posthoc.safetensors"
    result = kd_in_process(
        "cmatrix", "from-teacher", "--teacher-model", f"timm:{MODEL}", "--teacher-weights", str(weights["checkpoint"]),
        "--teacher-image-size", str(SIZE), "--dataset", "digits", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr
    cm = load_cmatrix(out)
    assert cm.source == "posthoc" and cm.class_names == tuple(DIGITS) and cm.alpha == pytest.approx(0.1)
    assert cm.teacher_model == f"timm:{MODEL}" and cm.teacher_top1 is None
    assert cm.extra["teacher_weights"] == "teacher.pt"  # the base name: a shared file does not say where it lay
    assert cm.extra["teacher_weights_sha256"] == sha256(weights["checkpoint"])
    torch.testing.assert_close(cm.probs.double(), independent_posthoc(weights["net"]), rtol=1e-4, atol=1e-5)


def test_teacher_classes_file_that_matches_is_accepted(tmp_path, weights):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(DIGITS) + "\n")
    result = kd_in_process(
        "distill", "--teacher-model", MODEL, "--teacher-weights", str(weights["renamed"]), "--teacher-classes", str(classes),
        "--teacher-image-size", str(SIZE), "--model", "tiny_cnn", "--out", str(tmp_path / "s"), "--max-steps", "1", "--epochs", "1",
    )
    assert result.returncode == 0, result.stderr  # the file's names override the weights' metadata


@pytest.mark.parametrize("case", [
    "class-count", "class-names", "classes-file", "missing", "corrupt", "not-weights", "both-teachers", "no-weights", "unknown-model",
])
@pytest.mark.parametrize("command", ["distill", "from-teacher"])
def test_bad_pretrained_teacher_input_is_one_line(tmp_path, weights, case, command):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights["safetensors"].read_bytes()[:500])
    text = tmp_path / "notes.pt"
    text.write_text("not weights\n")
    wrong_classes = tmp_path / "classes.txt"
    wrong_classes.write_text("\n".join(DIGITS[:5] + ["ten"] + DIGITS[6:]) + "\n")
    flags, fragments = {
        "class-count": (["--teacher-weights", str(weights["three"])], ["outputs 3 classes", "has 10"]),
        "class-names": (["--teacher-weights", str(weights["renamed"])], ["teacher class 0 is 'digit-0'", "'0'"]),
        "classes-file": (["--teacher-weights", str(weights["safetensors"]), "--teacher-classes", str(wrong_classes)],
                         ["teacher class 5 is 'ten'", "'5'"]),
        "missing": (["--teacher-weights", str(tmp_path / "nowhere.safetensors")], ["file not found"]),
        "corrupt": (["--teacher-weights", str(truncated)], ["not a valid safetensors file"]),
        "not-weights": (["--teacher-weights", str(text)], ["neither a safetensors file nor a PyTorch state dict"]),
        "both-teachers": (["--teacher-weights", str(weights["safetensors"]), "TEACHER_DIR"], ["RUN_DIR", "--teacher-model"]),
        "no-weights": ([], ["needs --teacher-weights"]),
        "unknown-model": (["--teacher-weights", str(weights["safetensors"]), "MODEL=no_such_net"], ["no_such_net", "tv:NAME"]),
    }[case]
    model = next((flag.split("=", 1)[1] for flag in flags if flag.startswith("MODEL=")), MODEL)
    flags = [flag for flag in flags if not flag.startswith("MODEL=")]
    teacher_dir = str(tmp_path / "teacher-run")
    if command == "distill":
        flags = [*(["--teacher", teacher_dir] if f == "TEACHER_DIR" else [f] for f in flags)]
        flags = [f for group in flags for f in group]
        args = ["distill", "--model", "tiny_cnn", "--out", str(tmp_path / "out"), *FAST]
    else:
        flags = [teacher_dir if f == "TEACHER_DIR" else f for f in flags]
        args = ["cmatrix", "from-teacher", "--out", str(tmp_path / "c.safetensors")]
    result = kd_in_process(*args, "--teacher-model", model, "--teacher-image-size", str(SIZE), *flags)
    assert_one_line_error(result, *fragments, **SHORT_ERROR)
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# teachers of other class sets and channel counts: the network is built as the weights file says

POSITIONS = [901, 17, 555, 3, 999, 0, 420, 64, 777, 300]  # where digit d sits among the 1000 classes


@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory) -> dict:
    """A 1000-class test_resnet (no names in its file) with a class-names file placing the digits at
    POSITIONS; a 1-channel 10-class one; a 1-channel torchvision squeezenet1_1 file."""
    import torchvision

    folder = tmp_path_factory.mktemp("other-teachers")
    torch.manual_seed(1)
    wide = timm.create_model(MODEL, num_classes=1000).eval()
    gray = timm.create_model(MODEL, num_classes=10, in_chans=1).eval()
    names = [f"class{i}" for i in range(1000)]
    for digit, position in enumerate(POSITIONS):
        names[position] = DIGITS[digit]
    files = {
        "wide": wide, "gray": gray,
        "wide_file": folder / "wide.safetensors", "names": folder / "names.txt", "missing_seven": folder / "no7.txt",
        "gray_file": folder / "gray.safetensors", "tv_gray_file": folder / "tv-gray.pt",
    }
    save_file(wide.state_dict(), str(files["wide_file"]))
    files["names"].write_text("\n".join(names) + "\n")
    files["missing_seven"].write_text("\n".join("seven" if name == "7" else name for name in names) + "\n")
    save_file(gray.state_dict(), str(files["gray_file"]), metadata={"class_names": json.dumps(DIGITS)})
    squeeze = torchvision.models.squeezenet1_1(weights=None, num_classes=10).state_dict()
    squeeze["features.0.weight"] = squeeze["features.0.weight"][:, :1].clone()
    torch.save(squeeze, files["tv_gray_file"])
    return files


def test_superset_teacher_cmatrix_uses_the_datas_classes_among_its_own(tmp_path, other_teachers):
    out = tmp_path / "posthoc.safetensors"
    result = kd_in_process(
        "cmatrix", "from-teacher", "--teacher-model", MODEL, "--teacher-weights", str(other_teachers["wide_file"]),
        "--teacher-classes", str(other_teachers["names"]), "--teacher-image-size", str(SIZE), "--out", str(out),
    )
    assert result.returncode == 0, result.stderr
    cm = load_cmatrix(out)
    assert cm.class_names == tuple(DIGITS) and cm.extra["teacher_num_classes"] == "1000"
    wide = other_teachers["wide"]
    expected = independent_posthoc(lambda x: wide(x)[:, POSITIONS])
    torch.testing.assert_close(cm.probs.double(), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_built_teacher_logits_are_the_networks_picked_and_reordered_by_name(tmp_path, weights, other_teachers):
    from kd.models.pretrained import load_pretrained_teacher

    data = load_dataset("digits")
    images = (data.train.images[:8].float() / 255.0 - data.mean[0]) / data.std[0]
    pixels = TF.normalize(TF.resize(images * data.std[0] + data.mean[0], [SIZE, SIZE], antialias=True).repeat(1, 3, 1, 1),
                          [0.5] * 3, [0.5] * 3)
    wide = load_pretrained_teacher(MODEL, other_teachers["wide_file"], SIZE, other_teachers["names"]).build(data)
    torch.testing.assert_close(wide.net(images), other_teachers["wide"](pixels)[:, POSITIONS])
    assert wide.shared_record()["teacher_num_classes"] == "1000"
    reversed_names = tmp_path / "reversed.txt"  # the same 10 classes, in another order: re-ordered by name
    reversed_names.write_text("\n".join(reversed(DIGITS)) + "\n")
    flipped = load_pretrained_teacher(MODEL, weights["safetensors"], SIZE, reversed_names).build(data)
    torch.testing.assert_close(flipped.net(images), weights["net"](pixels).flip(1))
    assert "teacher_num_classes" not in flipped.shared_record()


def test_one_channel_teacher_file_runs_on_gray_and_rgb_data(tmp_path, other_teachers):
    import dataclasses

    from kd.data.datasets import InMemorySplit
    from kd.models.pretrained import load_pretrained_teacher

    gray = load_dataset("digits")
    assert gray.channels == 1
    rgb_train = InMemorySplit(gray.train.images.repeat(1, 3, 1, 1), gray.train.labels)
    rgb = dataclasses.replace(gray, channels=3, train=rgb_train, mean=gray.mean * 3, std=gray.std * 3)
    pretrained = load_pretrained_teacher(MODEL, other_teachers["gray_file"], SIZE)
    assert pretrained.input == InputConfig(1, (SIZE, SIZE), (0.5,), (0.5,))
    images = (gray.train.images[:8].float() / 255.0 - gray.mean[0]) / gray.std[0]
    pixels = TF.resize(images * gray.std[0] + gray.mean[0], [SIZE, SIZE], antialias=True)
    with torch.no_grad():
        expected = other_teachers["gray"](TF.normalize(pixels, [0.5], [0.5]))
        torch.testing.assert_close(pretrained.build(gray).net(images), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pretrained.build(rgb).net(images.repeat(1, 3, 1, 1)), expected, rtol=1e-4, atol=1e-5)

    out = tmp_path / "student"
    result = kd_in_process(
        "distill", "--teacher-model", f"timm:{MODEL}", "--teacher-weights", str(other_teachers["gray_file"]),
        "--teacher-image-size", str(SIZE), "--model", "tiny_cnn", "--out", str(out), "--max-steps", "1", "--epochs", "1",
    )
    assert result.returncode == 0, result.stderr
    config, _ = read_run(out)
    assert config["teacher_input"] == {"channels": 1, "size": [SIZE, SIZE], "mean": [0.5], "std": [0.5]}
    assert config["teacher_num_classes"] == 10


@pytest.mark.parametrize("case", ["superset-no-names", "names-miss-a-class", "names-count", "tv-one-channel"])
@pytest.mark.parametrize("command", ["distill", "from-teacher"])
def test_other_class_set_misfits_are_one_line(tmp_path, other_teachers, weights, case, command):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(DIGITS + ["ten"]) + "\n")
    model, flags, fragments = {
        "superset-no-names": (MODEL, ["--teacher-weights", str(other_teachers["wide_file"])],
                              ["outputs 1000 classes", "has 10", "--teacher-classes"]),
        "names-miss-a-class": (MODEL, ["--teacher-weights", str(other_teachers["wide_file"]),
                                       "--teacher-classes", str(other_teachers["missing_seven"])], ["class '7'", "1000 classes"]),
        "names-count": (MODEL, ["--teacher-weights", str(weights["safetensors"]), "--teacher-classes", str(short)],
                        ["lists 11 class names", "outputs 10"]),
        "tv-one-channel": ("tv:squeezenet1_1", ["--teacher-weights", str(other_teachers["tv_gray_file"])],
                           ["features.0", "1 channel", "takes 3"]),
    }[case]
    if command == "distill":
        args = ["distill", "--model", "tiny_cnn", "--out", str(tmp_path / "out"), *FAST]
    else:
        args = ["cmatrix", "from-teacher", "--out", str(tmp_path / "c.safetensors")]
    result = kd_in_process(*args, "--teacher-model", model, "--teacher-image-size", str(SIZE), *flags)
    assert_one_line_error(result, *fragments, **SHORT_ERROR)
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.safetensors").exists()
