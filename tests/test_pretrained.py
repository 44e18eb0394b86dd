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
