"""Image classifiers by name: a few built-ins for small images, plus any timm model.

`build_model(name, num_classes, in_channels, image_size)` returns an `nn.Module` that maps
(N, in_channels, H, W) images to (N, num_classes) logits. Weights are always freshly
initialised (never downloaded).

Built-ins (see `BUILTIN_MODELS`):

* `small_cnn` (the default): three 3x3 conv-BN-ReLU layers and a global average pool, sized
  for tiny images such as the 8x8 scikit-learn digits.
* `lenet`: LeNet-5 style (conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84, fc K) with
  "same" padding and an adaptive pool to the classic 16x5x5 feature map, so any input size
  works.
* `alexnet`: the CIFAR-style AlexNet of the label-smoothing literature (convs 64-192-384-256-256
  with 3x3 kernels and three max-pools, dropout classifier), adaptive-pooled to 2x2.
* `cifar_resnet18/34/50/101`: torchvision ResNets with the CIFAR stem (3x3 stride-1 conv, no
  max-pool).

Any other name that `timm.is_model` knows is created with `timm.create_model(name,
pretrained=False, num_classes=..., in_chans=...)`, passing `img_size=image_size` to models
whose constructor takes it (ViT, Swin, ...), so fixed-size models match the data.

The built-ins are size-agnostic (max-pools use `ceil_mode`, heads use adaptive pooling), so
`image_size` only matters for timm models; it is still validated for all.
"""

from __future__ import annotations

from typing import Callable

import timm
import torchvision
from torch import nn

from kd.errors import KDError, one_line

BUILTIN_MODELS: dict[str, str] = {
    "small_cnn": "small 3-layer CNN (32-64-128 channels, ~0.1M params) for tiny images (default)",
    "tiny_cnn": "the same CNN at a quarter of the width (8-16-32 channels, ~6k params): a small student",
    "lenet": "LeNet-5 style CNN (conv 6/16 5x5, fc 120-84-K), size-agnostic via adaptive pooling",
    "alexnet": "CIFAR-style AlexNet (convs 64-192-384-256-256, 3x3 kernels, dropout classifier)",
    "cifar_resnet18": "torchvision ResNet-18 with a CIFAR stem (3x3 stride-1 conv, no max-pool)",
    "cifar_resnet34": "torchvision ResNet-34 with a CIFAR stem (3x3 stride-1 conv, no max-pool)",
    "cifar_resnet50": "torchvision ResNet-50 with a CIFAR stem (3x3 stride-1 conv, no max-pool)",
    "cifar_resnet101": "torchvision ResNet-101 with a CIFAR stem (3x3 stride-1 conv, no max-pool)",
}


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _small_cnn(num_classes: int, in_channels: int, width: int = 32) -> nn.Module:
    return nn.Sequential(
        *_conv_bn_relu(in_channels, width),
        *_conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2, ceil_mode=True),
        *_conv_bn_relu(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(4 * width, num_classes),
    )


def _tiny_cnn(num_classes: int, in_channels: int) -> nn.Module:
    return _small_cnn(num_classes, in_channels, width=8)


def _lenet(num_classes: int, in_channels: int) -> nn.Module:
    # Padding 2 keeps each 5x5 conv "same"-sized, so even 8x8 inputs survive both pools; the
    # adaptive pool then restores LeNet-5's 16 x 5 x 5 = 400 features for fc 120.
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 16, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(5),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(inplace=True),
        nn.Linear(120, 84),
        nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )


def _alexnet(num_classes: int, in_channels: int) -> nn.Module:
    # 32x32 input: 32 -> pool 16 -> pool 8 -> pool 4 -> adaptive 2x2, i.e. 256 x 2 x 2 features.
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(64, 192, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(256 * 2 * 2, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )


def _cifar_resnet(factory: Callable[..., nn.Module]) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        model = factory(weights=None, num_classes=num_classes)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
        return model

    return build


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": _small_cnn,
    "tiny_cnn": _tiny_cnn,
    "lenet": _lenet,
    "alexnet": _alexnet,
    "cifar_resnet18": _cifar_resnet(torchvision.models.resnet18),
    "cifar_resnet34": _cifar_resnet(torchvision.models.resnet34),
    "cifar_resnet50": _cifar_resnet(torchvision.models.resnet50),
    "cifar_resnet101": _cifar_resnet(torchvision.models.resnet101),
}
assert _BUILDERS.keys() == BUILTIN_MODELS.keys()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _build_timm(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    kwargs = dict(pretrained=False, num_classes=num_classes, in_chans=in_channels)
    try:
        try:
            # Fixed-size models (ViT, Swin, ...) take img_size; convnets reject it with a
            # TypeError from their constructor, and then we build without it.
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:
            return timm.create_model(name, **kwargs)
    except (ValueError, AssertionError, RuntimeError, TypeError) as exc:
        raise KDError(
            f"timm model '{name}' cannot be built for {in_channels}-channel {image_size}px "
            f"images with {num_classes} classes: {one_line(exc)}"
        ) from exc


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build a freshly initialised classifier: (N, in_channels, H, W) -> (N, num_classes) logits.

    `name` is a key of `BUILTIN_MODELS` or any timm model name (`timm.list_models()`), which is
    created with `pretrained=False`. Raises `KDError` for an unknown name, num_classes < 2,
    in_channels not 1 or 3, or a non-positive image_size.
    """
    if not _is_int(num_classes) or num_classes < 2:
        raise KDError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not _is_int(in_channels) or in_channels not in (1, 3):
        raise KDError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
    if not _is_int(image_size) or image_size < 1:
        raise KDError(f"image_size must be a positive integer, got {image_size!r}")
    builder = _BUILDERS.get(name)
    if builder is not None:
        return builder(num_classes, in_channels)
    if isinstance(name, str) and name and timm.is_model(name):
        return _build_timm(name, num_classes, in_channels, image_size)
    raise KDError(
        f"unknown model {name!r}: use a built-in ({', '.join(BUILTIN_MODELS)}) "
        "or any timm model name (see timm.list_models())"
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements in `model` (shared parameters counted once, frozen included)."""
    return sum(p.numel() for p in model.parameters())
