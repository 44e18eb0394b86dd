"""Training augmentations the user chooses (`--augment crop,flip,...`), batched on the device.

Every augmentation is a callable ``(images, targets) -> (images, targets)`` over a whole batch,
so the ones that make soft labels (Mixup, CutMix) fit the same shape as the ones that do not.
They run in the order the user lists them, in two spaces:

* uint8 space, before normalisation: ``crop`` (pad by reflection and crop back at a random
  offset, the CIFAR recipe of He et al. 2016 with reflect padding as in DeVries & Taylor 2017),
  ``flip`` (horizontal, p = 0.5), ``randaugment`` (Cubuk et al. 2020, "RandAugment: Practical
  automated data augmentation with a reduced search space": N ops of torchvision's list at
  magnitude M of 30, each image drawing its own ops and signs);
* float space, after normalisation: ``cutout`` (DeVries & Taylor 2017, "Improved
  Regularization of Convolutional Neural Networks with Cutout": one square per image zeroed in
  normalised space, its centre uniform over the image, clipped at the border), ``mixup``
  (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization") and ``cutmix`` (Yun et al.
  2019, "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
  Features"). With both of the last two listed, each batch uses one of them (CutMix with
  probability `mix_switch_prob`, as timm's ``switch_prob``). Both then turn the targets into
  (N, K) float32 label distributions.

All randomness is drawn from one `torch.Generator` on the batches' device (the engine saves its
state in checkpoints), never from a global RNG, so the same seed gives the same batches and a
resumed run continues bitwise. Beta samples, which torch cannot draw from a generator, come
from a NumPy generator seeded by a number drawn from it.

Streaming data (large ImageFolder trees) is cropped in the DataLoader workers instead, with
`StreamingResizedCrop` (the Inception-style random-resized crop with timm's defaults), seeded
from the run seed, the epoch and the sample index; the other augmentations still run on the
device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd.errors import KDError

AUGMENTATIONS: tuple[str, ...] = ("crop", "flip", "cutout", "randaugment", "mixup", "cutmix")
# Augmentations of uint8 images (before normalisation) and of normalised float images (after).
UINT8_AUGMENTATIONS: tuple[str, ...] = ("crop", "flip", "randaugment")
FLOAT_AUGMENTATIONS: tuple[str, ...] = ("cutout", "mixup", "cutmix")
_MIXING = ("mixup", "cutmix")

# Each dataset's augmentations when the user chooses none: no flips for digits (a mirrored 2
# is no 2), nor for house numbers.
_DEFAULT_AUGMENT = {
    "digits": ("crop",),
    "mnist": ("crop",),
    "svhn": ("crop",),
    "cifar10": ("crop", "flip"),
    "cifar100": ("crop", "flip"),
    "fashionmnist": ("crop", "flip"),
    "imagefolder": ("crop", "flip"),
}

# RandAugment: torchvision's number of magnitude levels (M is one of 0..30).
RANDAUGMENT_LEVELS = 31
# The streaming crop (timm's RandomResizedCropAndInterpolation defaults).
STREAMING_CROP_SCALE = (0.08, 1.0)
STREAMING_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

Transform = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class AugmentOptions:
    """The chosen augmentations (`names`, applied in that order) and their parameters."""

    names: tuple[str, ...]
    crop_padding: int | None = None  # None: round(size / 8), at least 1
    cutout_size: int | None = None  # None: size // 2
    randaugment_n: int = 2
    randaugment_m: int = 9
    mixup_alpha: float = 0.8  # timm's default
    cutmix_alpha: float = 1.0
    mix_switch_prob: float = 0.5

    def applied_order(self) -> tuple[str, ...]:
        """The order the pipeline applies them in: the uint8 ones (crop, flip, randaugment) as listed,
        then the ones on normalised images (cutout, mixup, cutmix) as listed."""
        return tuple(n for n in self.names if n in UINT8_AUGMENTATIONS) + tuple(n for n in self.names if n in FLOAT_AUGMENTATIONS)

    def padding(self, image_size: int) -> int:
        """The crop padding for `image_size`: the option, or round(size / 8), at least 1."""
        return self.crop_padding if self.crop_padding is not None else max(1, round(image_size / 8))

    def cutout_side(self, image_size: int) -> int:
        """The Cutout square's side for `image_size`: the option, or size // 2 (at least 1)."""
        return self.cutout_size if self.cutout_size is not None else max(1, image_size // 2)

    def resolved(self, image_size: int, *, streaming: bool = False) -> dict[str, Any]:
        """Every value with defaults filled in for `image_size`, JSON-able (for config.json).

        `streaming=True` records the crop the DataLoader workers make instead of the padding.
        """
        crop: dict[str, Any] = (
            {"crop": "random_resized", "crop_scale": list(STREAMING_CROP_SCALE), "crop_ratio": list(STREAMING_CROP_RATIO)}
            if streaming
            else {"crop_padding": self.padding(image_size)}
        )
        return {
            "names": list(self.names),
            "applied_order": list(self.applied_order()),
            **crop,
            "cutout_size": self.cutout_side(image_size),
            "randaugment_n": self.randaugment_n,
            "randaugment_m": self.randaugment_m,
            "mixup_alpha": float(self.mixup_alpha),
            "cutmix_alpha": float(self.cutmix_alpha),
            "mix_switch_prob": float(self.mix_switch_prob),
        }


# ----------------------------------------------------------------------------- names and checks


def _choices() -> str:
    return f"choose from {', '.join(AUGMENTATIONS)} (comma-separated), or none"


def _check_names(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name not in AUGMENTATIONS:
            raise KDError(f"unknown augmentation {name!r} in --augment; {_choices()}")
        if name in seen:
            raise KDError(f"augmentation {name!r} is listed twice in --augment; {_choices()}")
        seen.add(name)


def parse_augment(text: str) -> tuple[str, ...]:
    """`--augment` text to names: "crop,flip" -> ("crop", "flip"); "none" -> ().

    Names are case-insensitive; an unknown or repeated name is a one-line KDError listing the choices.
    """
    parts = [part.strip().lower() for part in str(text).split(",")]
    if parts == ["none"]:
        return ()
    if "none" in parts:
        raise KDError(f"--augment none cannot be combined with other names; {_choices()}")
    _check_names(parts)
    return tuple(parts)


def default_augment(dataset_key: str) -> tuple[str, ...]:
    """The augmentations a dataset gets when the user chooses none (its key as in `kd.data.datasets.DATASET_NAMES`)."""
    try:
        return _DEFAULT_AUGMENT[dataset_key]
    except KeyError:
        raise KDError(f"no default augmentation for dataset {dataset_key!r}; known: {', '.join(_DEFAULT_AUGMENT)}") from None


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def check_augment(options: AugmentOptions, image_size: int) -> None:
    """A one-line KDError naming the flag for any bad value, or for a float-space augmentation
    (cutout, mixup, cutmix) listed before a uint8-space one (crop, flip, randaugment)."""
    _check_names(options.names)
    padding, side = options.padding(image_size), options.cutout_side(image_size)
    if not _whole(padding) or not 1 <= padding < image_size:
        raise KDError(f"--crop-padding must be a whole number from 1 to {image_size - 1} (reflect padding of {image_size}-pixel images), got {padding!r}")
    if not _whole(side) or not 1 <= side <= image_size:
        raise KDError(f"--cutout-size must be a whole number from 1 to {image_size} (the image side), got {side!r}")
    if not _whole(options.randaugment_n) or options.randaugment_n < 1:
        raise KDError(f"--randaugment-n must be a whole number of ops per image, at least 1, got {options.randaugment_n!r}")
    if not _whole(options.randaugment_m) or not 0 <= options.randaugment_m < RANDAUGMENT_LEVELS:
        raise KDError(f"--randaugment-m must be a whole number from 0 to {RANDAUGMENT_LEVELS - 1}, got {options.randaugment_m!r}")
    for flag, alpha in (("--mixup-alpha", options.mixup_alpha), ("--cutmix-alpha", options.cutmix_alpha)):
        if not _real(alpha) or alpha <= 0:
            raise KDError(f"{flag} must be a number > 0 (the Beta(alpha, alpha) parameter), got {alpha!r}")
    if not _real(options.mix_switch_prob) or not 0 <= options.mix_switch_prob <= 1:
        raise KDError(f"--mix-switch-prob must be a probability in [0, 1], got {options.mix_switch_prob!r}")


def makes_soft_labels(options: AugmentOptions) -> bool:
    """Whether the pipeline yields (N, K) label distributions (Mixup or CutMix is listed)."""
    return any(name in options.names for name in _MIXING)


# ----------------------------------------------------------------------------- randomness


def _randint(generator: torch.Generator, high: int, size: Sequence[int], device: torch.device) -> Tensor:
    return torch.randint(0, high, tuple(size), generator=generator, device=device)


def _numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A NumPy generator seeded by one number drawn from `generator` (for Beta samples and boxes)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())  # a host generator: no device sync
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- uint8 space


class RandomCrop:
    """Pad each image by reflection (`padding` pixels a side) and crop it back at a random offset.

    The CIFAR recipe (He et al. 2016, "Deep Residual Learning for Image Recognition"), with
    reflect padding as in DeVries & Taylor 2017. Each image draws its own offset (top, left)
    in [0, 2 * padding]; the windows are picked from a strided view of the padded batch.
    """

    def __init__(self, padding: int, generator: torch.Generator) -> None:
        self.padding, self.generator = padding, generator

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = images.shape
        p = self.padding
        top, left = _randint(self.generator, 2 * p + 1, (2, n), images.device)
        padded = torch.nn.functional.pad(images, (p, p, p, p), mode="reflect")
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # N x C x (2p+1) x (2p+1) x H x W, a view
        return windows[torch.arange(n, device=images.device), :, top, left], targets


class HorizontalFlip:
    """Mirror each image left-right with probability 0.5."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        flip = _randint(self.generator, 2, (images.shape[0],), images.device).bool()[:, None, None, None]
        return torch.where(flip, images.flip(3), images), targets


def _affine(image: Tensor, *, translate: Sequence[int] = (0, 0), shear: Sequence[float] = (0.0, 0.0),
            center: list[int] | None = None) -> Tensor:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    return F.affine(image, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear),
                    interpolation=InterpolationMode.NEAREST, fill=None, center=center)


def _randaugment_ops() -> tuple[tuple[str, Callable[[int, int], Tensor] | None, bool, Callable[[Tensor, float], Tensor]], ...]:
    """torchvision's RandAugment space (v2.RandAugment._AUGMENTATION_SPACE, same order and ranges):
    (name, magnitudes(height, width) over the 31 levels or None, signed, apply(images, magnitude)).

    torchvision is imported here and in `_affine`, not with this module: it costs seconds that
    runs without RandAugment never need.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    bins = RANDAUGMENT_LEVELS

    def levels(low: float, high: float) -> Callable[[int, int], Tensor]:
        return lambda height, width: torch.linspace(low, high, bins)

    def shear(m: float) -> list[float]:
        return [math.degrees(math.atan(m)), 0.0]

    return (
        ("Identity", None, False, lambda x, m: x),
        ("ShearX", levels(0.0, 0.3), True, lambda x, m: _affine(x, shear=shear(m), center=[0, 0])),
        ("ShearY", levels(0.0, 0.3), True, lambda x, m: _affine(x, shear=shear(m)[::-1], center=[0, 0])),
        ("TranslateX", lambda h, w: torch.linspace(0.0, 150.0 / 331.0 * w, bins), True,
         lambda x, m: _affine(x, translate=(int(m), 0))),
        ("TranslateY", lambda h, w: torch.linspace(0.0, 150.0 / 331.0 * h, bins), True,
         lambda x, m: _affine(x, translate=(0, int(m)))),
        ("Rotate", levels(0.0, 30.0), True,
         lambda x, m: F.rotate(x, angle=m, interpolation=InterpolationMode.NEAREST, fill=None)),
        ("Brightness", levels(0.0, 0.9), True, lambda x, m: F.adjust_brightness(x, brightness_factor=1.0 + m)),
        ("Color", levels(0.0, 0.9), True, lambda x, m: F.adjust_saturation(x, saturation_factor=1.0 + m)),
        ("Contrast", levels(0.0, 0.9), True, lambda x, m: F.adjust_contrast(x, contrast_factor=1.0 + m)),
        ("Sharpness", levels(0.0, 0.9), True, lambda x, m: F.adjust_sharpness(x, sharpness_factor=1.0 + m)),
        ("Posterize", lambda h, w: (8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int(), False,
         lambda x, m: F.posterize(x, bits=int(m))),
        ("Solarize", levels(1.0, 0.0), False, lambda x, m: F.solarize(x, threshold=255.0 * m)),
        ("AutoContrast", None, False, lambda x, m: F.autocontrast(x)),
        ("Equalize", None, False, lambda x, m: F.equalize(x)),
    )


class RandAugment:
    """RandAugment (Cubuk et al. 2020): `num_ops` ops per image at magnitude `magnitude` of 30.

    torchvision's op list and magnitude ranges (nearest interpolation, fill 0), but unlike
    `torchvision.transforms.v2.RandAugment`, which applies one draw to a whole batch, every
    image draws its own ops and signs, as in the paper. Images that drew the same (op, sign)
    in a round go through that torchvision op together.
    """

    def __init__(self, num_ops: int, magnitude: int, image_size: int, generator: torch.Generator) -> None:
        self.num_ops, self.generator = num_ops, generator  # a host (CPU) generator: the draws decide host-side loops
        self.ops = [
            (name, 0.0 if levels is None else float(levels(image_size, image_size)[magnitude]), signed, apply)
            for name, levels, signed, apply in _randaugment_ops()
        ]
        self.signed = torch.tensor([signed for _, _, signed, _ in self.ops])

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        n, host = images.shape[0], torch.device("cpu")
        draws = _randint(self.generator, len(self.ops), (self.num_ops, n), host)
        negative = _randint(self.generator, 2, (self.num_ops, n), host).bool()
        negative &= self.signed[draws]  # an unsigned op has one group, not two
        keys = draws * 2 + negative  # the (op, sign) of every image and round, on the host: no device sync
        images = images.clone()
        for round_keys in keys:
            for key in torch.unique(round_keys).tolist():
                name, magnitude, _, apply = self.ops[key // 2]
                if name != "Identity":
                    index = torch.nonzero(round_keys == key).flatten().to(images.device)
                    images[index] = apply(images[index], -magnitude if key % 2 else magnitude)
        return images, targets


# ----------------------------------------------------------------------------- float space


class Cutout:
    """Cutout (DeVries & Taylor 2017): zero one `size` x `size` square per image, in normalised
    space as in their code; its centre is uniform over the image and it is clipped at the border."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.generator = size, generator

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = images.shape
        top = _randint(self.generator, h, (n,), images.device) - self.size // 2  # centre - size // 2: the
        left = _randint(self.generator, w, (n,), images.device) - self.size // 2  # square may stick out (clipped)
        rows = torch.arange(h, device=images.device)
        cols = torch.arange(w, device=images.device)
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + self.size)  # N x H
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + self.size)  # N x W
        return images.masked_fill(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0), targets


class MixBatch:
    """Mixup (Zhang et al. 2018) and/or CutMix (Yun et al. 2019) over a batch and its (N, K) targets.

    Each call draws a partner for every image (a permutation of the batch) and one lam for
    the whole batch (timm's default 'batch' mode). Mixup: lam ~ Beta(mixup_alpha, mixup_alpha),
    images lam * x + (1 - lam) * x[perm]. CutMix: lam ~ Beta(cutmix_alpha, cutmix_alpha), a box
    of area (1 - lam) of the image (centre uniform, clipped at the border, as in the paper's
    code) is pasted from x[perm], and lam becomes the exact kept area. Targets are mixed with
    the same lam. With both alphas given, a batch uses CutMix with probability `switch_prob`.
    """

    def __init__(self, mixup_alpha: float | None, cutmix_alpha: float | None, switch_prob: float,
                 generator: torch.Generator) -> None:
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob, self.generator = switch_prob, generator  # a host (CPU) generator: lam and the box are Python numbers

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = images.shape
        rng = _numpy_rng(self.generator)
        perm = torch.randperm(n, generator=self.generator).to(images.device)
        cutmix = self.mixup_alpha is None or (self.cutmix_alpha is not None and rng.random() < self.switch_prob)
        if cutmix:
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            cut = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(h * cut), int(w * cut)
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            top, bottom = (int(v) for v in np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h))
            left, right = (int(v) for v in np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w))
            images = images.clone()
            images[:, :, top:bottom, left:right] = images[perm, :, top:bottom, left:right]
            lam = 1.0 - float((bottom - top) * (right - left)) / (h * w)
        else:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            images = torch.lerp(images[perm], images, lam)  # lam * x + (1 - lam) * x[perm]
        return images, targets * lam + targets[perm] * (1.0 - lam)


# ----------------------------------------------------------------------------- the pipeline


class Pipeline:
    """uint8 NCHW images and (N,) labels -> normalised float images and targets.

    Runs `uint8_ops`, then `normalize`, then `float_ops`. Targets stay (N,) int64 class indices,
    or become (N, K) float32 one-hot rows before the float ops when `soft` (Mixup/CutMix).
    """

    def __init__(self, names: tuple[str, ...], uint8_ops: Sequence[Transform], normalize: Callable[[Tensor], Tensor],
                 float_ops: Sequence[Transform], num_classes: int, soft: bool) -> None:
        self.names = names
        self.uint8_ops, self.float_ops = list(uint8_ops), list(float_ops)
        self.normalize, self.num_classes, self.soft = normalize, num_classes, soft

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        targets = labels
        for op in self.uint8_ops:
            images, targets = op(images, targets)
        images = self.normalize(images)
        if self.soft:
            targets = torch.nn.functional.one_hot(targets, self.num_classes).to(torch.float32)
        for op in self.float_ops:
            images, targets = op(images, targets)
        return images, targets


def build_pipeline(
    options: AugmentOptions,
    *,
    image_size: int,
    num_classes: int,
    normalize: Callable[[Tensor], Tensor],
    generator: torch.Generator,
    host_generator: torch.Generator | None = None,
    streaming: bool = False,
) -> Pipeline:
    """The `Pipeline` for `options` (checked with `check_augment`), drawing from `generator`.

    Draws that decide Python-side control flow (RandAugment's ops, Mixup/CutMix's lam and box)
    come from `host_generator`, a CPU generator (`generator` itself when that is one), so that
    a GPU pipeline never waits for a device-to-host copy.

    `streaming=True` leaves out ``crop``: streaming data is cropped in the DataLoader workers
    (`StreamingResizedCrop`).
    """
    check_augment(options, image_size)
    names = options.names
    host = host_generator if host_generator is not None else generator
    if host.device.type != "cpu":
        raise ValueError("host_generator must be a CPU generator (pass one when `generator` is on a GPU)")
    ops: list[tuple[str, Transform]] = []
    for name in names:
        if name == "crop" and not streaming:
            ops.append((name, RandomCrop(options.padding(image_size), generator)))
        elif name == "flip":
            ops.append((name, HorizontalFlip(generator)))
        elif name == "randaugment":
            ops.append((name, RandAugment(options.randaugment_n, options.randaugment_m, image_size, host)))
        elif name == "cutout":
            ops.append((name, Cutout(options.cutout_side(image_size), generator)))
        elif name in _MIXING and not any(kind in _MIXING for kind, _ in ops):  # one op for both, at the first
            mixup = options.mixup_alpha if "mixup" in names else None
            cutmix = options.cutmix_alpha if "cutmix" in names else None
            ops.append((name, MixBatch(mixup, cutmix, options.mix_switch_prob, host)))
    return Pipeline(
        names,
        [op for name, op in ops if name in UINT8_AUGMENTATIONS],
        normalize,
        [op for name, op in ops if name in FLOAT_AUGMENTATIONS],
        num_classes,
        makes_soft_labels(options),
    )


# ----------------------------------------------------------------------------- streaming crop


class StreamingResizedCrop:
    """The random-resized crop of streaming training data, made in the DataLoader workers.

    The Inception crop (Szegedy et al. 2015, "Going deeper with convolutions") as torchvision's
    RandomResizedCrop draws it (ten tries, then a centre crop), with timm's defaults: area
    scale (0.08, 1) and aspect ratio (3/4, 4/3); the crop is resized to size x size (bilinear,
    antialiased). Sample `index` of epoch `epoch` draws from a NumPy generator seeded by
    (seed, epoch, index), so the crops do not depend on workers, ranks or resumption.
    Picklable, for workers started by spawn.
    """

    def __init__(self, size: int, seed: int, epoch: int,
                 scale: tuple[float, float] = STREAMING_CROP_SCALE, ratio: tuple[float, float] = STREAMING_CROP_RATIO) -> None:
        self.size, self.seed, self.epoch, self.scale, self.ratio = size, seed, epoch, scale, ratio

    def box(self, width: int, height: int, index: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop of sample `index` from a width x height image."""
        rng = np.random.default_rng([self.seed % 2**64, self.epoch, index])
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        aspect = width / height  # fallback: the whole image, cut to the nearest allowed ratio
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Any, index: int) -> Tensor:
        """A PIL image -> uint8 C x size x size tensor, cropped as sample `index` draws."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        top, left, h, w = self.box(image.width, image.height, index)
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size],
                               interpolation=InterpolationMode.BILINEAR, antialias=True)
        return F.pil_to_tensor(image)
