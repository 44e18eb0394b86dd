"""Fine-tuning from weights (`--pretrained-path`, `--pretrained`): what is loaded, adapted and
re-initialised, checked against the weights file the test wrote, and every bad file in one line.

The pretrained network is timm's `test_resnet` (0.37M parameters) or torchvision's resnet18 with
random weights saved by the test, as a 1,000-class RGB ImageNet model would be; the data is a
1-channel 10-class folder at 16 px. One optimizer step at a negligible learning rate shows what
the run started from.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from tests.helpers import ENV, KD, assert_one_line_error, kd_in_process, make_image_folder, read_run, tensors

CLASSES = tuple(f"c{k}" for k in range(10))
STEP = ["--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--lr", "1e-30", "--weight-decay", "0",
        "--image-size", "16", "--augment", "none"]


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gray10")
    make_image_folder(root, mode="L", classes=CLASSES, per_class=2, size=16)
    return root


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> dict[str, Path]:
    """1,000-class RGB weights of timm's test_resnet (safetensors and a checkpoint dict) and torchvision's resnet18."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    files = {"timm": folder / "test_resnet.safetensors", "timm_pt": folder / "test_resnet.pth", "tv": folder / "resnet18.pth"}
    state = timm.create_model("test_resnet", num_classes=1000).state_dict()
    save_file(state, str(files["timm"]))
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, files["timm_pt"])  # DDP keys
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), files["tv"])
    return files


def _weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return tensors(path)
    loaded = torch.load(path, weights_only=True)
    state = loaded.get("model", loaded)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_started_from(run: Path, file: Path, first_conv: str, head: str) -> None:
    """Every body parameter as in the file, the first convolution summed over RGB, the head fresh."""
    source, trained = _weights(file), tensors(run / "model.safetensors")
    body = [k for k in trained if k in source and not k.startswith(f"{head}.") and k != f"{first_conv}.weight"
            and "running_" not in k and "num_batches" not in k]  # BN statistics move in a training step
    assert len(body) > 10
    for key in body:
        assert torch.allclose(trained[key], source[key], rtol=0, atol=1e-12), key
    expected_conv = source[f"{first_conv}.weight"].sum(dim=1, keepdim=True)  # timm's RGB -> gray rule
    assert torch.allclose(trained[f"{first_conv}.weight"], expected_conv, rtol=0, atol=1e-12)
    assert trained[f"{head}.weight"].shape == (10, source[f"{head}.weight"].shape[1])
    assert not any(torch.allclose(trained[f"{head}.weight"][0], row) for row in source[f"{head}.weight"][:50])


@pytest.mark.parametrize("model,key,first_conv,head", [
    ("test_resnet", "timm", "conv1.0", "fc"),
    ("timm:test_resnet", "timm_pt", "conv1.0", "fc"),
    ("tv:resnet18", "tv", "conv1", "fc"),
])
def test_imagenet_weights_start_a_gray_ten_class_run(gray_folder, imagenet_like, tmp_path, model, key, first_conv, head):
    out = tmp_path / "run"
    result = kd_in_process("train-teacher", "--method", "onehot", "--dataset", "imagefolder", "--data-dir", str(gray_folder),
                           "--model", model, "--pretrained-path", str(imagenet_like[key]), "--out", str(out), *STEP)
    assert result.returncode == 0, result.stderr
    assert "classifier fc re-initialised" in result.stdout and f"{first_conv} adapted from 3 to 1" in result.stdout
    _check_started_from(out, imagenet_like[key], first_conv, head)
    config, _ = read_run(out)
    assert config["pretrained_path"] == str(imagenet_like[key].resolve())
    assert len(config["pretrained_sha256"]) == 64
    if model.startswith("tv:"):  # torchvision's own normalisation (ImageNet's), averaged for gray data
        assert config["mean"] == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    else:
        assert config["mean"] == [0.5]  # test_resnet's pretrained config
    # What reads the run later (kd plot, cmatrix from-teacher, soft-labels) normalises as the run did.
    from kd.training.run_data import load_run_data

    assert list(load_run_data(out, config).mean) == config["mean"]


def test_a_runs_weights_keep_their_classifier_by_class_name(gray_folder, tmp_path):
    """A kd run's model.safetensors names its classes: same classes keep their rows (by name), others don't."""
    first = tmp_path / "first"
    assert kd_in_process("train-teacher", "--method", "onehot", "--dataset", "imagefolder", "--data-dir", str(gray_folder),
                         "--model", "tiny_cnn", "--out", str(first), *STEP).returncode == 0
    saved = tensors(first / "model.safetensors")
    names = json.loads(__import__("safetensors").safe_open(str(first / "model.safetensors"), "pt").metadata()["class_names"])
    assert names == list(CLASSES)

    # The same classes in another order (folder names c9 ... c0 sort differently when renamed): rows follow the names.
    renamed = tmp_path / "renamed"
    make_image_folder(renamed, mode="L", classes=("c3", "c1", "c2"), per_class=2, size=16)
    second = tmp_path / "second"
    result = kd_in_process("train-teacher", "--method", "onehot", "--dataset", "imagefolder", "--data-dir", str(renamed),
                           "--model", "tiny_cnn", "--pretrained-path", str(first / "model.safetensors"), "--out", str(second), *STEP)
    assert result.returncode == 0, result.stderr
    assert "classifier rows picked by class name (3 of 10)" in result.stdout
    head = tensors(second / "model.safetensors")["13.weight"]
    assert torch.allclose(head, saved["13.weight"][[1, 2, 3]], rtol=0, atol=1e-12)  # c1, c2, c3: the data's order

    other = tmp_path / "other"
    make_image_folder(other, mode="L", classes=("x", "y"), per_class=2, size=16)
    result = kd_in_process("train-teacher", "--method", "onehot", "--dataset", "imagefolder", "--data-dir", str(other),
                           "--model", "tiny_cnn", "--pretrained-path", str(first / "model.safetensors"), "--out", str(tmp_path / "third"), *STEP)
    assert result.returncode == 0, result.stderr
    assert "classifier 13 re-initialised (the weights name other classes" in result.stdout


def test_bad_weights_files_are_one_line_and_nothing_is_written(gray_folder, imagenet_like, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(imagenet_like["timm"].read_bytes()[:5000])
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    cases = [
        (imagenet_like["tv"], "does not fit --model test_resnet"),  # another architecture
        (truncated, "not a valid safetensors file"),
        (text, "neither a safetensors file nor a PyTorch state dict"),
        (tmp_path / "missing.pth", "file not found"),
        (tmp_path, "is a directory"),
    ]
    for file, fragment in cases:
        out = tmp_path / "out"
        result = kd_in_process("train-teacher", "--dataset", "imagefolder", "--data-dir", str(gray_folder),
                               "--model", "test_resnet", "--pretrained-path", str(file), "--out", str(out), *STEP)
        assert_one_line_error(result, "--pretrained-path", fragment)
        assert not out.exists(), file
    result = kd_in_process("train-teacher", "--model", "tiny_cnn", "--pretrained", "--out", str(tmp_path / "out"), *STEP)
    assert_one_line_error(result, "--pretrained", "no published weights", "--pretrained-path")
    result = kd_in_process("train-teacher", "--model", "test_resnet", "--pretrained", "--pretrained-path",
                           str(imagenet_like["timm"]), "--out", str(tmp_path / "out"), *STEP)
    assert_one_line_error(result, "pass one")


def test_pretrained_offline_is_one_line_naming_pretrained_path(tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache, no network
    result = subprocess.run([KD, "train-teacher", "--model", "test_resnet", "--pretrained", "--out", str(tmp_path / "out"), *STEP],
                            capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(result, "--pretrained: cannot get the published weights of test_resnet", "--pretrained-path FILE")
    assert not (tmp_path / "out").exists()


def test_resume_refuses_other_weights(gray_folder, imagenet_like, tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(imagenet_like["timm"].read_bytes())
    out = tmp_path / "run"
    args = ["train-teacher", "--method", "onehot", "--dataset", "imagefolder", "--data-dir", str(gray_folder),
            "--model", "test_resnet", "--pretrained-path", str(weights), "--out", str(out), "--checkpoint-every", "1",
            "--epochs", "2", "--batch-size", "8", "--image-size", "16", "--augment", "none"]
    assert kd_in_process(*args, "--max-steps", "2").returncode == 0
    torch.manual_seed(1)
    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), str(weights))
    result = kd_in_process(*args, "--max-steps", "2", "--resume")
    assert_one_line_error(result, "--resume: --pretrained-path", "pretrained")
    assert os.path.exists(out / "model.safetensors")


def test_a_run_teacher_sees_its_own_normalisation_when_the_student_has_another():
    """A student started from a pretrained model is fed its model's mean and std; a --teacher RUN_DIR
    trained on the data's own statistics gets its batches re-normalised to those."""
    from dataclasses import replace

    from kd.data.datasets import load_dataset
    from kd.models.pretrained import Teacher, renormalised_run_teacher

    data = load_dataset("digits")
    student_view = replace(data, mean=(0.5,), std=(0.25,))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    config = {"mean": list(data.mean), "std": list(data.std)}
    teacher = renormalised_run_teacher(Teacher(net=net, model="x"), config, student_view)
    pixels = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        seen = teacher.net((pixels - 0.5) / 0.25)
        own = net((pixels - data.mean[0]) / data.std[0])
    assert torch.allclose(seen, own, atol=1e-5)
    same = Teacher(net=net, model="x")
    assert renormalised_run_teacher(same, config, data).net is net  # same statistics: no adapter


def test_layer_decay_rates_grow_from_the_stem_to_the_head_and_c_learns_at_the_full_rate():
    from kd.methods import Setup, get_method, resolve_params
    from kd.training.loop import TrainModule
    from kd.training.optim import build_optimizer

    for model in ("test_resnet", "tiny_cnn", "tv:resnet18"):
        from kd.models.networks import build_model

        net = build_model(model, 10, 1, 16)
        module = TrainModule(net, get_method("lspp")(Setup(10, CLASSES, resolve_params(get_method("lspp"), {}))))
        optimizer = build_optimizer(module, 0.1, 5e-4, layer_decay=0.5, num_classes=10)
        rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        names = [name for name, _ in module.named_parameters()]
        assert len(rate) == len(names)  # every parameter in exactly one group
        by_name = {name: rate[id(p)] for name, p in module.named_parameters()}
        assert by_name["criterion.logits"] == 0.1  # the C logits: full rate
        head = [name for name in names if name.startswith("net.fc.") or name.startswith("net.13.")]
        assert head and all(by_name[name] == 0.1 for name in head), model
        net_rates = [by_name[name] for name in names if name.startswith("net.")]
        assert net_rates[0] < 0.1 and net_rates == sorted(net_rates), model  # stem slowest, rates never fall towards the head
        assert all(any(abs(r - 0.1 * 0.5 ** k) < 1e-12 for k in range(40)) for r in net_rates)  # lr x decay^k
        decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
        assert decay[id(module.criterion.logits)] == 0.0
        assert all(decay[id(p)] == 0.0 for name, p in module.named_parameters() if p.ndim <= 1)


def test_head_only_epochs_leave_the_body_as_it_started(tmp_path):
    start = tmp_path / "start"
    base = ["train-teacher", "--model", "tiny_cnn", "--batch-size", "64", "--augment", "none"]
    assert kd_in_process(*base, "--epochs", "1", "--max-steps", "3", "--out", str(start)).returncode == 0
    source = tensors(start / "model.safetensors")
    probe, both = tmp_path / "probe", tmp_path / "both"
    for out, epochs in ((probe, "1"), (both, "2")):
        result = kd_in_process(*base, "--pretrained-path", str(start / "model.safetensors"), "--head-only-epochs", "1",
                               "--epochs", epochs, "--lr", "0.1", "--out", str(out))
        assert result.returncode == 0, result.stderr
    probed, tuned = tensors(probe / "model.safetensors"), tensors(both / "model.safetensors")
    body = [key for key in source if not key.startswith("13.")]  # tiny_cnn's classifier is layer 13
    assert all(torch.equal(probed[key], source[key]) for key in body)  # weights and BatchNorm statistics
    assert not torch.equal(probed["13.weight"], source["13.weight"])
    assert not torch.equal(tensors(probe / "cmatrix.safetensors")["cmatrix"], torch.full((10, 10), 1 / 9).fill_diagonal_(0))
    assert not torch.equal(tuned["0.weight"], source["0.weight"])  # the second epoch trains everything
    config, _ = read_run(both)
    assert config["head_only_epochs"] == 1
