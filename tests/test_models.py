"""Tests for kd.models.networks: every built-in builds and runs, the paper's exact networks, timm fallback, errors, CIFAR stem."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kd.errors import KDError
from kd.models.networks import BUILTIN_MODELS, FIXED_SIZE_MODELS, build_model, count_parameters
from tests.helpers import assert_one_line_kderror

K = 7  # an unusual class count, so a hard-coded 10 would show
CIFAR_RESNETS = ["cifar_resnet18", "cifar_resnet34", "cifar_resnet50", "cifar_resnet101"]
ANY_SIZE_SMALL = ["small_cnn", "tiny_cnn", "lenet_padded", "alexnet_cifar3x3"]


def sizes_for(name: str) -> tuple[int, ...]:
    """The input sides a built-in is tried at: its one side if fixed, else a tiny and a CIFAR one."""
    return (FIXED_SIZE_MODELS[name],) if name in FIXED_SIZE_MODELS else (8, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this file's many small forward passes on one intra-op thread.

    These tests are dominated by per-op overhead (deep ResNets on tiny batches), and when other
    processes compete for the 2 cores, two spin-waiting threads are several times slower than
    one. The previous setting is restored for the rest of the suite.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_builtin_names():
    assert set(BUILTIN_MODELS) == {"lenet", "alexnet", *ANY_SIZE_SMALL, *CIFAR_RESNETS}
    assert FIXED_SIZE_MODELS == {"lenet": 32, "alexnet": 32}
    for name, description in BUILTIN_MODELS.items():
        assert description and "\n" not in description, name


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_builtin_output_shape(name, in_channels):
    for size in sizes_for(name):
        model = build_model(name, K, in_channels, size)
        assert isinstance(model, nn.Module)
        out = model.train()(torch.randn(2, in_channels, size, size))
        assert out.shape == (2, K)
        assert torch.isfinite(out).all()
        with torch.no_grad():
            out = model.eval()(torch.randn(1, in_channels, size, size))
        assert out.shape == (1, K)


@pytest.mark.parametrize("size", [9, 13, 17, 28, 33, 64])
@pytest.mark.parametrize("name", ANY_SIZE_SMALL)
def test_small_builtins_accept_odd_and_large_sizes(name, size):
    model = build_model(name, K, 1, size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, K)


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_gradients_flow(name):
    size = sizes_for(name)[0]
    model = build_model(name, K, 3, size).train()
    x = torch.randn(4, 3, size, size, requires_grad=True)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, K - 1]))
    loss.backward()
    assert torch.isfinite(loss)
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
    # The gradient reaches the very first layer and the input.
    first = next(model.parameters())
    assert first.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "in_channels"), [(name, 1) for name in CIFAR_RESNETS] + [("cifar_resnet18", 3)]
)
def test_cifar_resnet_stem(name, in_channels):
    model = build_model(name, K, in_channels, 32)
    assert isinstance(model, torchvision.models.ResNet)
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert conv1.in_channels == in_channels and conv1.out_channels == 64
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == K
    # Only the stem differs from torchvision's ResNet: 7x7x3 stem weights out, 3x3xC in.
    factory = getattr(torchvision.models, name.removeprefix("cifar_"))
    reference = factory(weights=None, num_classes=K)
    expected = count_parameters(reference) - 64 * 3 * 7 * 7 + 64 * in_channels * 3 * 3
    assert count_parameters(model) == expected


def test_cifar_resnet_keeps_full_resolution_into_layer1():
    model = build_model("cifar_resnet18", K, 3, 32).eval()
    shapes = []
    model.layer1.register_forward_hook(lambda module, inputs, output: shapes.append(output.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 64, 32, 32)]


def test_timm_model_with_one_channel():
    model = build_model("resnet18", K, 1, 32)
    assert isinstance(model, timm.models.resnet.ResNet)
    assert model.conv1.in_channels == 1
    assert model.get_classifier().out_features == K
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, K)
        assert model(torch.randn(1, 1, 224, 224)).shape == (1, K)


def test_timm_model_gets_img_size_when_it_takes_one():
    # A ViT is built for a fixed input size: without img_size it would reject 32x32 inputs.
    model = build_model("vit_tiny_patch16_224", K, 3, 32).eval()
    assert tuple(model.patch_embed.img_size) == (32, 32)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, K)


def test_timm_models_are_not_pretrained(monkeypatch):
    calls = []
    real_create = timm.create_model

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    build_model("mobilenetv3_small_050", K, 1, 16)
    assert calls and all(call.get("pretrained") is False for call in calls)
    assert calls[-1]["in_chans"] == 1 and calls[-1]["num_classes"] == K


def test_unknown_model_message():
    with pytest.raises(KDError) as info:
        build_model("no_such_model_xyz", K, 3, 32)
    message = assert_one_line_kderror(info)
    assert "'no_such_model_xyz'" in message and "unknown model" in message
    for name in BUILTIN_MODELS:
        assert name in message
    assert "timm" in message


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet18", "resnet18"])
@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_bad_num_classes(name, num_classes):
    with pytest.raises(KDError, match="num_classes"):
        build_model(name, num_classes, 3, 32)


@pytest.mark.parametrize("name", ["small_cnn", "lenet", "resnet18"])
@pytest.mark.parametrize("in_channels", [0, 2, 4])
def test_bad_in_channels(name, in_channels):
    with pytest.raises(KDError, match="in_channels"):
        build_model(name, K, in_channels, 32)


def test_bad_image_size():
    with pytest.raises(KDError, match="image_size"):
        build_model("small_cnn", K, 3, 0)


def test_count_parameters():
    linear = nn.Linear(3, 2)
    assert count_parameters(linear) == 3 * 2 + 2
    assert count_parameters(nn.Sequential(linear, linear)) == 8  # shared weights count once
    frozen = nn.Linear(4, 1)
    frozen.requires_grad_(False)
    assert count_parameters(nn.Sequential(linear, frozen)) == 8 + 5
    model = build_model("lenet_padded", K, 1, 28)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the paper's networks


def _layers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize(("name", "in_channels", "expected"), [
    ("alexnet", 3, 2_472_266),
    ("lenet", 3, 62_006),
    ("lenet", 1, 61_706),
])
def test_paper_networks_have_the_papers_parameter_counts(name, in_channels, expected):
    model = build_model(name, 10, in_channels, 32)
    assert count_parameters(model) == expected
    with torch.no_grad():
        assert model.eval()(torch.randn(3, in_channels, 32, 32)).shape == (3, 10)


def test_paper_alexnet_layers():
    model = build_model("alexnet", K, 3, 32)
    convs = _layers(model, nn.Conv2d)
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (64, (11, 11), (4, 4), (5, 5)),
        (192, (5, 5), (1, 1), (2, 2)),
        (384, (3, 3), (1, 1), (1, 1)),
        (256, (3, 3), (1, 1), (1, 1)),
        (256, (3, 3), (1, 1), (1, 1)),
    ]
    assert [(fc.in_features, fc.out_features) for fc in _layers(model, nn.Linear)] == [(256, K)]
    assert len(_layers(model, nn.MaxPool2d)) == 3 and len(_layers(model, nn.ReLU)) == 5
    assert not _layers(model, nn.Dropout) and not _layers(model, nn.BatchNorm2d)
    # The reference code's order: conv, ReLU, then max-pool, and a 256 x 1 x 1 map into the head.
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds[:3] == ["Conv2d", "ReLU", "MaxPool2d"] and kinds[-3:] == ["MaxPool2d", "Flatten", "Linear"]
    shapes = []
    model[-2].register_forward_hook(lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 256, 1, 1)]


def test_paper_lenet_layers():
    model = build_model("lenet", K, 1, 32)
    convs = _layers(model, nn.Conv2d)
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(6, (5, 5), (0, 0)), (16, (5, 5), (0, 0))]
    assert [(fc.in_features, fc.out_features) for fc in _layers(model, nn.Linear)] == [(400, 120), (120, 84), (84, K)]
    assert not _layers(model, nn.AdaptiveAvgPool2d)
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds[:6] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d"]


def test_renamed_variants_keep_their_old_architecture():
    # The former `alexnet` and `lenet`, under names that say what they are.
    assert count_parameters(build_model("alexnet_cifar3x3", 10, 3, 32)) == 2_781_514
    padded = build_model("lenet_padded", 10, 3, 8)
    assert count_parameters(padded) == 62_006
    assert [c.padding for c in _layers(padded, nn.Conv2d)] == [(2, 2), (2, 2)]


@pytest.mark.parametrize("name", sorted(FIXED_SIZE_MODELS))
@pytest.mark.parametrize("size", [8, 28, 64])
def test_paper_networks_refuse_other_sizes_in_one_line(name, size):
    with pytest.raises(KDError) as info:
        build_model(name, K, 1, size)
    message = assert_one_line_kderror(info)
    assert f"{size}x{size}" in message and "--image-size 32" in message and "--model" in message
