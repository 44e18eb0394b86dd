"""Image classifiers by name: a few built-ins for small images, plus any timm model.

`build_model(name, num_classes, in_channels, image_size)` returns an `nn.Module` that maps
(N, in_channels, H, W) images to (N, num_classes) logits. Weights are always freshly
initialised (never downloaded).

Built-ins (see `BUILTIN_MODELS`):

* `small_cnn` (the default): three 3x3 conv-BN-ReLU layers and a global average pool, sized
  for tiny images such as the 8x8 scikit-learn digits.
* `tiny_cnn`: `small_cnn` at a quarter of the width, a small student.
* `lenet` and `alexnet`: the paper's small-image networks (its Table 3 rows; the reference
  code's `models_small.py`), exactly, for 32x32 inputs only (`FIXED_SIZE_MODELS`):
  - `lenet`: LeNet-5, conv 6@5x5 - ReLU - max-pool 2 - conv 16@5x5 - ReLU - max-pool 2 -
    fc 400-120-84-K with ReLUs; no padding. 62,006 parameters at K=10 with RGB input.
  - `alexnet`: conv 64@11x11 stride 4 pad 5 - ReLU - max-pool 2 - conv 192@5x5 pad 2 - ReLU -
    max-pool 2 - conv 384/256/256@3x3 pad 1, each followed by ReLU - max-pool 2 - one linear
    layer 256 -> K. 2,472,266 parameters at K=10 with RGB input.
  Other image sizes are refused with a `KDError` that names `--image-size 32` (the data
  layer resizes to it).
* `lenet_padded`: LeNet-5's layers with "same" padding and an adaptive pool to the classic
  16x5x5 feature map, so any input size works (the same 62,006 parameters at K=10, RGB).
* `alexnet_cifar3x3`: a CIFAR-style AlexNet with 3x3 kernels throughout (convs
  64-192-384-256-256, three max-pools, adaptive-pooled to 2x2, dropout classifier
  1024-512-K), any input size.
* `cifar_resnet18/34/50/101`: torchvision ResNets with the CIFAR stem (3x3 stride-1 conv, no
  max-pool).

`tv:NAME` is torchvision's classification model NAME (random init), its first convolution
taking one channel for gray data. Any other name that `timm.is_model` knows is created with `timm.create_model(name,
pretrained=False, num_classes=..., in_chans=...)`, passing `img_size=image_size` to models
whose constructor takes it (ViT, Swin, ...), so fixed-size models match the data.

Apart from `FIXED_SIZE_MODELS`, the built-ins are size-agnostic (max-pools use `ceil_mode`,
heads use adaptive pooling), so `image_size` matters only for those and timm models; it is
still validated for all.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from kd.errors import KDError, one_line

BUILTIN_MODELS: dict[str, str] = {
    "small_cnn": "small 3-layer CNN (32-64-128 channels, ~0.1M params) for tiny images (default)",
    "tiny_cnn": "the same CNN at a quarter of the width (8-16-32 channels, ~6k params): a small student",
    "lenet": "the paper's LeNet-5 (conv 6/16 5x5 unpadded, fc 400-120-84-K, 62k params); 32x32 input only",
    "lenet_padded": "LeNet-5 layers with same-padding and an adaptive pool to 16x5x5: any input size",
    "alexnet": "the paper's small-image AlexNet (conv 11x11/4, 5x5, 3x3 x3; 64-192-384-256-256; fc 256-K; "
    "2.47M params); 32x32 input only",
    "alexnet_cifar3x3": "CIFAR-style AlexNet with 3x3 kernels (64-192-384-256-256, dropout fc 1024-512-K): any input size",
    "cifar_resnet18": "torchvision ResNet-18 with a CIFAR stem (3x3 stride-1 conv, no max-pool)",
    "cifar_resnet34": "torchvision ResNet-34 with a CIFAR stem (3x3 stride-1 conv, no max-pool)",
    "cifar_resnet50": "torchvision ResNet-50 with a CIFAR stem (3x3 stride-1 conv, no max-pool)",
    "cifar_resnet101": "torchvision ResNet-101 with a CIFAR stem (3x3 stride-1 conv, no max-pool)",
}

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIXES = ("tv:", "torchvision:")


def split_model_name(name: str) -> tuple[str, str]:
    """("timm" | "torchvision" | "", bare name) for `timm:NAME`, `tv:NAME` / `torchvision:NAME` or a bare NAME."""
    if name.startswith(TIMM_PREFIX):
        return "timm", name[len(TIMM_PREFIX):]
    for prefix in TORCHVISION_PREFIXES:
        if name.startswith(prefix):
            return "torchvision", name[len(prefix):]
    return "", name


# Built-ins defined for one input side only, and what to use instead at other sizes.
FIXED_SIZE_MODELS: dict[str, int] = {"lenet": 32, "alexnet": 32}
_ANY_SIZE_ALTERNATIVE = {"lenet": "lenet_padded", "alexnet": "alexnet_cifar3x3"}


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


def _lenet_features(in_channels: int, padding: int, ceil_mode: bool) -> list[nn.Module]:
    """LeNet-5's conv 6@5x5 - ReLU - max-pool 2 - conv 16@5x5 - ReLU - max-pool 2."""
    return [
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=ceil_mode),
        nn.Conv2d(6, 16, kernel_size=5, padding=padding),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=ceil_mode),
    ]


def _lenet_classifier(num_classes: int) -> list[nn.Module]:
    """LeNet-5's fc 400-120-84-K with ReLUs, from a 16 x 5 x 5 feature map."""
    return [
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(inplace=True),
        nn.Linear(120, 84),
        nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    ]


def _lenet(num_classes: int, in_channels: int) -> nn.Module:
    """The paper's LeNet-5 for 32x32 input: 32 -conv5-> 28 -pool-> 14 -conv5-> 10 -pool-> 5."""
    return nn.Sequential(*_lenet_features(in_channels, padding=0, ceil_mode=False), *_lenet_classifier(num_classes))


def _lenet_padded(num_classes: int, in_channels: int) -> nn.Module:
    """LeNet-5's layers for any input size (the former `lenet`)."""
    # Padding 2 keeps each 5x5 conv "same"-sized, so even 8x8 inputs survive both pools; the
    # adaptive pool then restores LeNet-5's 16 x 5 x 5 = 400 features for fc 120.
    return nn.Sequential(
        *_lenet_features(in_channels, padding=2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(5),
        *_lenet_classifier(num_classes),
    )


def _alexnet_features(in_channels: int, first: tuple[int, int, int], second: tuple[int, int], ceil_mode: bool) -> list[nn.Module]:
    """AlexNet's five convs (64-192-384-256-256), each followed by ReLU, and three max-pools.

    `first` is the first conv's (kernel, stride, padding), `second` the second's (kernel, padding).
    """
    (kernel1, stride1, padding1), (kernel2, padding2) = first, second
    return [
        nn.Conv2d(in_channels, 64, kernel_size=kernel1, stride=stride1, padding=padding1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=ceil_mode),
        nn.Conv2d(64, 192, kernel_size=kernel2, padding=padding2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=ceil_mode),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=ceil_mode),
    ]


def _alexnet(num_classes: int, in_channels: int) -> nn.Module:
    """The paper's small-image AlexNet for 32x32 input: 32 -conv11/4-> 8 -pool-> 4 -pool-> 2 -pool-> 1."""
    return nn.Sequential(
        *_alexnet_features(in_channels, first=(11, 4, 5), second=(5, 2), ceil_mode=False),
        nn.Flatten(),
        nn.Linear(256, num_classes),
    )


def _alexnet_cifar3x3(num_classes: int, in_channels: int) -> nn.Module:
    """A CIFAR-style AlexNet with 3x3 kernels for any input size (the former `alexnet`)."""
    # 32x32 input: 32 -> pool 16 -> pool 8 -> pool 4 -> adaptive 2x2, i.e. 256 x 2 x 2 features.
    return nn.Sequential(
        *_alexnet_features(in_channels, first=(3, 1, 1), second=(3, 1), ceil_mode=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(256 * 2 * 2, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )


def _cifar_resnet(factory_name: str) -> Callable[[int, int], nn.Module]:
    """A builder for `torchvision.models.<factory_name>` with the CIFAR stem.

    torchvision is imported when the model is built, not with this module: importing it costs
    seconds (torchvision.ops pulls in torch._dynamo) that runs of the other models never need.
    """

    def build(num_classes: int, in_channels: int) -> nn.Module:
        import torchvision.models

        model = getattr(torchvision.models, factory_name)(weights=None, num_classes=num_classes)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
        return model

    return build


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": _small_cnn,
    "tiny_cnn": _tiny_cnn,
    "lenet": _lenet,
    "lenet_padded": _lenet_padded,
    "alexnet": _alexnet,
    "alexnet_cifar3x3": _alexnet_cifar3x3,
    "cifar_resnet18": _cifar_resnet("resnet18"),
    "cifar_resnet34": _cifar_resnet("resnet34"),
    "cifar_resnet50": _cifar_resnet("resnet50"),
    "cifar_resnet101": _cifar_resnet("resnet101"),
}
assert _BUILDERS.keys() == BUILTIN_MODELS.keys()
assert FIXED_SIZE_MODELS.keys() == _ANY_SIZE_ALTERNATIVE.keys() <= _BUILDERS.keys()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _build_timm(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import timm

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


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A torchvision classification model; for gray input its first convolution takes one channel."""
    import torchvision.models

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise KDError(f"unknown model tv:{name}: torchvision has no such classification model "
                      "(see torchvision.models.list_models(module=torchvision.models))")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
        raise KDError(f"model tv:{name} cannot be built with {num_classes} classes: {one_line(exc)}") from None
    if in_channels != 3:
        first, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        parent, _, attr = first.rpartition(".")
        replacement = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        setattr(model.get_submodule(parent) if parent else model, attr, replacement)
    return model


def _is_timm_model(name: str) -> bool:
    import timm  # only for names that are not built-ins (timm imports torchvision: seconds)

    return timm.is_model(name)


def _check_fixed_size(name: str, image_size: int) -> None:
    """A one-line `KDError` when a fixed-size built-in is asked for another image size."""
    side = FIXED_SIZE_MODELS.get(name)
    if side is not None and image_size != side:
        raise KDError(
            f"model {name!r} is the paper's network for {side}x{side} images, not "
            f"{image_size}x{image_size}: pass --image-size {side} (the data is resized to it), "
            f"or choose --model {_ANY_SIZE_ALTERNATIVE[name]} (any size)"
        )


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build a freshly initialised classifier: (N, in_channels, H, W) -> (N, num_classes) logits.

    `name` is a key of `BUILTIN_MODELS`, any timm model name (`timm.list_models()`, optionally
    `timm:NAME`), created with `pretrained=False`, or `tv:NAME`, a torchvision classification
    model (`weights=None`; for gray input its first convolution takes one channel). Raises `KDError` for an unknown name, num_classes < 2,
    in_channels not 1 or 3, a non-positive image_size, or an image_size other than the one a
    `FIXED_SIZE_MODELS` network is defined for.
    """
    if not _is_int(num_classes) or num_classes < 2:
        raise KDError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not _is_int(in_channels) or in_channels not in (1, 3):
        raise KDError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
    if not _is_int(image_size) or image_size < 1:
        raise KDError(f"image_size must be a positive integer, got {image_size!r}")
    builder = _BUILDERS.get(name)
    if builder is not None:
        _check_fixed_size(name, image_size)
        return builder(num_classes, in_channels)
    library, bare = split_model_name(name) if isinstance(name, str) else ("", name)
    if library == "torchvision":
        return _build_torchvision(bare, num_classes, in_channels)
    name = bare
    if isinstance(name, str) and name and _is_timm_model(name):
        return _build_timm(name, num_classes, in_channels, image_size)
    raise KDError(
        f"unknown model {name!r}: use a built-in ({', '.join(BUILTIN_MODELS)}), "
        "any timm model name (see timm.list_models()) or tv:NAME (a torchvision classification model)"
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements in `model` (shared parameters counted once, frozen included)."""
    return sum(p.numel() for p in model.parameters())
