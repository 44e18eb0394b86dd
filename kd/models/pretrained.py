"""Teacher networks: a trained run directory, or a pretrained timm / torchvision classifier.

Both are a `Teacher`: a network that takes the dataset's normalised batches, plus what run
cards and C-matrix files say about it. A run's teacher was trained on this data, so it is fed
the batches as they are. A pretrained classifier has its own input size and normalisation;
`TeacherInput` adapts each batch to it: de-normalise with the data's mean and std (back to
[0, 1] pixels), resize to the teacher's input size (bilinear, antialiased), convert gray to RGB
(repeat) or RGB to gray (luminance), and normalise with the teacher's mean and std.

Pretrained teachers are named `timm:NAME` or `tv:NAME` (torchvision); a bare NAME is a timm
model if timm knows it, else a torchvision classification model. Their weights come from a
local file only (nothing is ever downloaded): a safetensors file, or a PyTorch state dict read
with `torch.load(weights_only=True)` (also inside a checkpoint dict under "state_dict",
"model" or "model_state_dict"). Class names travel in the safetensors metadata key
`class_names` (a JSON list, as in C-matrix files), in a checkpoint dict's "class_names" entry,
or in a text file with one name per line (`--teacher-classes`).

The network is built as the file says: its class count from the classifier's weight, its input
channel count from the first convolution's (timm's `in_chans`; torchvision's networks take 3),
and the weights are loaded as they are (a teacher is used as trained). A teacher of the data's
class count is used as it is (its names, if known, must be the data's: in another order, its
logits are re-ordered by name). A teacher of more classes needs names: its logits are restricted
to the data's classes, picked by name, in the data's order (`ClassSubset`).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageDataset
from kd.errors import KDError, one_line
from kd.models.networks import split_model_name
from kd.models.weights import WeightsFile, classifier_names, first_conv_name, read_weights_file

IMAGENET_SIZE = 224
LUMINANCE = (0.299, 0.587, 0.114)  # RGB -> gray, as PIL's "L" mode

TEACHER_MODEL_HELP = (
    "Pretrained classifier as teacher (with --teacher-weights FILE; nothing is downloaded): timm:NAME or tv:NAME "
    "(torchvision); a bare NAME is timm's if timm knows it, else torchvision's (resnet18 is timm's, tv:resnet18 "
    "torchvision's). A timm tag (NAME.TAG) picks that tag's input size and normalisation."
)
TEACHER_WEIGHTS_HELP = (
    "Weights of --teacher-model: a safetensors file, or a PyTorch state dict (torch.load weights_only; also a "
    "checkpoint dict holding it under state_dict, model or model_state_dict). The network is built with the file's "
    "class count and input channels (1 or 3; torchvision models: 3). Its classes must be the dataset's or a superset "
    "of them, by name (safetensors metadata key class_names, a JSON list, or --teacher-classes): a superset's logits "
    "are restricted to the dataset's classes, in the dataset's order."
)
TEACHER_IMAGE_SIZE_HELP = (
    "Side length the --teacher-model sees (default: its own, from timm's pretrained config or torchvision's "
    "weights metadata). Batches are de-normalised, resized to it and normalised with the teacher's mean and std."
)
TEACHER_CLASSES_HELP = (
    "Text file with the --teacher-model's class names, one per line, in output order (overrides names in the "
    "weights file); they must include every class of the dataset. Needed when the teacher has more classes than "
    "the dataset and its weights file names none."
)


@dataclass
class Teacher:
    """A classifier fed the dataset's normalised batches, and what records say about it."""

    net: nn.Module  # (N, C, H, W) normalised like the data -> (N, K) logits
    model: str  # its name in run cards and C-matrix files
    top1: float | None = None  # its recorded test accuracy, if any
    alpha: float | None = None  # the LS++ / LS mass it was trained with, if any
    record: dict[str, Any] = field(default_factory=dict)  # config.json / C-matrix provenance

    def shared_record(self) -> dict[str, str]:
        """What a shared file (a C-matrix, soft labels) records of the weights: the file's name and SHA-256, not where
        it lay; and the teacher's class count where its logits were restricted to the data's classes."""
        if "teacher_weights" not in self.record:
            return {}
        shared = {"teacher_weights": Path(self.record["teacher_weights"]).name,
                  "teacher_weights_sha256": self.record["teacher_weights_sha256"]}
        if "teacher_num_classes" in self.record:
            shared["teacher_num_classes"] = str(self.record["teacher_num_classes"])
        return shared


# ---------------------------------------------------------------------------------------------
# a run directory's teacher


def load_run_teacher(run_dir: str | os.PathLike) -> tuple[Teacher, dict]:
    """The network of a finished run, with its top-1 (metrics.json) and alpha; and its config.json."""
    from kd.training.rundir import METRICS_FILE, load_run_model, read_run_json

    net, config = load_run_model(run_dir)
    top1 = None
    if (Path(run_dir) / METRICS_FILE).is_file():
        top1 = read_run_json(run_dir, METRICS_FILE, "").get("test_top1")
    alpha = config.get("alpha")
    return Teacher(net=net, model=config["model"], top1=top1, alpha=float(alpha) if alpha else None), config


def check_run_teacher_fits(run_dir: str | os.PathLike, config: dict, data: ImageDataset) -> None:
    """A one-line `KDError` unless the run's teacher was trained on the data's classes and geometry."""
    if list(config["class_names"]) != list(data.class_names):
        raise KDError(
            f"teacher {run_dir} was trained on classes {config['class_names'][:5]}..., "
            f"the dataset has {list(data.class_names)[:5]}...: train the student on the teacher's dataset"
        )
    if (config["in_channels"], config["image_size"]) != (data.channels, data.image_size):
        raise KDError(
            f"teacher {run_dir} sees {config['in_channels']}x{config['image_size']}px images, "
            f"the dataset gives {data.channels}x{data.image_size}px: pass --image-size {config['image_size']}"
        )


def renormalised_run_teacher(teacher: Teacher, config: dict, data: ImageDataset) -> Teacher:
    """A run's teacher fed `data`'s batches: behind an adapter to its own normalisation when the data's
    differs (a student started from a pretrained model sees its model's mean and std, say)."""
    mean, std = config.get("mean"), config.get("std")
    if mean is None or std is None or (list(mean), list(std)) == (list(data.mean), list(data.std)):
        return teacher
    own = InputConfig(data.channels, (data.image_size, data.image_size), tuple(mean), tuple(std))
    teacher.net = AdaptedTeacher(TeacherInput(data.mean, data.std, own), teacher.net).eval()
    return teacher


# ---------------------------------------------------------------------------------------------
# model names and input configuration


@dataclass(frozen=True)
class ModelSpec:
    """A pretrained classifier's library ("timm" or "torchvision") and name."""

    library: str
    name: str

    @property
    def display(self) -> str:
        return f"{'timm' if self.library == 'timm' else 'tv'}:{self.name}"


def _torchvision_classifiers() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def parse_teacher_model(text: str) -> ModelSpec:
    """`timm:NAME`, `tv:NAME` / `torchvision:NAME`, or a bare NAME (timm first, then torchvision)."""
    import timm

    library, name = split_model_name(text.strip())
    if library == "timm":
        if not timm.is_model(name):
            raise KDError(f"--teacher-model {text}: timm has no model {name!r} (see timm.list_models())")
        return ModelSpec("timm", name)
    if library == "torchvision":
        if name not in _torchvision_classifiers():
            raise KDError(
                f"--teacher-model {text}: torchvision has no classification model {name!r} "
                "(see torchvision.models.list_models(module=torchvision.models))"
            )
        return ModelSpec("torchvision", name)
    if name and timm.is_model(name):
        return ModelSpec("timm", name)
    if name in _torchvision_classifiers():
        return ModelSpec("torchvision", name)
    raise KDError(
        f"--teacher-model {text}: neither a timm model (timm.list_models()) nor a torchvision classification "
        "model; name it timm:NAME or tv:NAME"
    )


@dataclass(frozen=True)
class InputConfig:
    """What a teacher network takes: channels, (height, width), per-channel mean and std in [0, 1] units."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "size": list(self.size), "mean": list(self.mean), "std": list(self.std)}


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values * channels if len(values) == 1 else values


def teacher_input_config(spec: ModelSpec, image_size: int | None = None) -> InputConfig:
    """The teacher's own input size and normalisation (timm: its pretrained config; torchvision: its
    weights' transforms metadata, else ImageNet's 224 px), with `image_size` overriding the size."""
    if image_size is not None and image_size < 1:
        raise KDError(f"--teacher-image-size must be a positive integer, got {image_size}")
    if spec.library == "timm":
        import timm
        from timm.data import resolve_data_config

        pretrained_cfg = timm.get_pretrained_cfg(spec.name)
        cfg = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg is not None else {})
        channels, height, width = (int(v) for v in cfg["input_size"])
        mean, std = cfg["mean"], cfg["std"]
    else:
        channels, height, width, mean, std = 3, IMAGENET_SIZE, IMAGENET_SIZE, IMAGENET_MEAN, IMAGENET_STD
        try:
            import torchvision.models

            transforms = torchvision.models.get_model_weights(spec.name).DEFAULT.transforms()
            height = width = int(transforms.crop_size[0])
            mean, std = transforms.mean, transforms.std
        except (ValueError, KeyError, AttributeError, IndexError, TypeError):
            pass  # no weights metadata for this model: ImageNet's defaults
    if image_size is not None:
        height = width = image_size
    return InputConfig(channels, (height, width), _per_channel(mean, channels), _per_channel(std, channels))


def with_channels(config: InputConfig, channels: int) -> InputConfig:
    """`config` for a network of `channels` input channels: gray takes the mean of the RGB means and stds."""
    if channels == config.channels:
        return config
    if channels == 1:
        mean, std = (sum(config.mean) / len(config.mean),), (sum(config.std) / len(config.std),)
    else:
        mean, std = _per_channel(config.mean[:1], channels), _per_channel(config.std[:1], channels)
    return InputConfig(channels, config.size, mean, std)


class TeacherInput(nn.Module):
    """The data's normalised batches -> the teacher's input (see the module docstring)."""

    def __init__(self, data_mean: Sequence[float], data_std: Sequence[float], teacher: InputConfig) -> None:
        super().__init__()
        self.size = tuple(teacher.size)
        self.channels = teacher.channels

        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor([float(v) for v in values], dtype=torch.float32).view(1, -1, 1, 1)

        # Not persistent: checkpoints of a KD run hold the networks' weights only.
        self.register_buffer("data_mean", column(data_mean), persistent=False)
        self.register_buffer("data_std", column(data_std), persistent=False)
        self.register_buffer("teacher_mean", column(teacher.mean), persistent=False)
        self.register_buffer("teacher_std", column(teacher.std), persistent=False)
        self.register_buffer("luminance", column(LUMINANCE), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float() * self.data_std + self.data_mean
        if tuple(pixels.shape[-2:]) != self.size:
            pixels = F.interpolate(pixels, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        if pixels.shape[1] == 1 and self.channels == 3:
            pixels = pixels.expand(-1, 3, -1, -1)
        elif pixels.shape[1] == 3 and self.channels == 1:
            pixels = (pixels * self.luminance).sum(dim=1, keepdim=True)
        return (pixels - self.teacher_mean) / self.teacher_std


class ClassSubset(nn.Module):
    """Logits (N, K) -> (N, len(rows)): the columns `rows`, in that order (the data's classes among the teacher's)."""

    def __init__(self, rows: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("rows", torch.tensor(list(rows), dtype=torch.long), persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_select(1, self.rows)


class AdaptedTeacher(nn.Module):
    """A pretrained network behind its input adapter, its logits restricted to some classes if `rows` says:
    `net(adapter(images))[:, rows]`."""

    def __init__(self, adapter: TeacherInput, net: nn.Module, rows: Sequence[int] | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.net = net
        self.classes = ClassSubset(rows) if rows is not None else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.adapter(images))
        return self.classes(logits) if self.classes is not None else logits


def read_class_names_file(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (surrounding spaces and blank lines ignored)."""
    where = f"--teacher-classes {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KDError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KDError(f"{where}: cannot read it as UTF-8 text ({one_line(error, 80)})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise KDError(f"{where}: no class names in it (one per line)")
    return names


# ---------------------------------------------------------------------------------------------
# a pretrained teacher


PROBE_CLASSES = 7  # the class count of the network built to find the classifier (an unlikely layer width)


def _build_network(spec: ModelSpec, num_classes: int, channels: int = 3) -> nn.Module:
    try:
        if spec.library == "timm":
            import timm

            return timm.create_model(spec.name, pretrained=False, num_classes=num_classes, in_chans=channels)
        import torchvision.models

        return torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes)
    except (ValueError, TypeError, AssertionError, RuntimeError) as error:
        raise KDError(f"teacher {spec.display} cannot be built with {num_classes} classes: {one_line(error, 120)}") from None


def _probe_network(spec: ModelSpec) -> nn.Module:
    """The network built for `PROBE_CLASSES` classes, to find its classifier and first convolution: on the
    meta device (no memory, no initialisation), else, for a network that cannot be built there, on the CPU."""
    try:
        with torch.device("meta"):
            return _build_network(spec, PROBE_CLASSES)
    except Exception:  # noqa: BLE001 - some networks compute values while they are built
        return _build_network(spec, PROBE_CLASSES)


def file_layout(spec: ModelSpec, weights: WeightsFile) -> tuple[int | None, int]:
    """(the class count, the input channel count) of `spec`'s network as `weights` hold it: the classifier's
    weight's rows, and the first convolution's input channels (None / 3 where the file lacks the tensor)."""
    probe = _probe_network(spec)
    state = weights.state
    try:
        heads = classifier_names(probe, PROBE_CLASSES)
    except KDError:
        heads = ()
    counts = {int(state[key].shape[0]) for head in heads for key in (f"{head}.weight", f"{head}.bias")
              if key in state and state[key].ndim >= 1}
    num_classes = counts.pop() if len(counts) == 1 else None
    channels = 3
    conv = first_conv_name(probe)
    key = f"{conv}.weight" if conv else None
    if key in state and state[key].ndim == 4:
        channels = int(state[key].shape[1]) * int(probe.get_submodule(conv).groups)
    if channels != 3 and spec.library == "torchvision":
        raise KDError(
            f"--teacher-weights {weights.path}: its first convolution {conv} takes {channels} channel(s); "
            f"torchvision's {spec.name} takes 3: save the teacher with 3 input channels, or use a timm model (timm:NAME)"
        )
    if channels not in (1, 3):
        raise KDError(
            f"--teacher-weights {weights.path}: its first convolution {conv} takes {channels} channels; "
            "a teacher takes 1 (gray) or 3 (RGB)"
        )
    return num_classes, channels


def _load_weights(net: nn.Module, weights: WeightsFile, spec: ModelSpec) -> None:
    """Load `weights` into `net` (built with their class and channel counts) as they are, naming the first misfit."""
    expected = net.state_dict()
    state = weights.state
    mismatched = [
        (key, tuple(value.shape), tuple(expected[key].shape))
        for key, value in state.items() if key in expected and value.shape != expected[key].shape
    ]
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
    if mismatched:
        key, got, want = mismatched[0]
        problems.append(f"{len(mismatched)} of another shape (first {key!r}: {list(got)} in the file, {list(want)} in the model)")
    if problems:
        raise KDError(f"--teacher-weights {weights.path}: do not fit {spec.display}: tensors {'; '.join(problems)}")
    net.load_state_dict(state, strict=False)  # the only keys left out are num_batches_tracked counters


def check_teacher_class_names(names: Sequence[str] | None, data_names: Sequence[str], where: str) -> None:
    """A one-line `KDError` naming the first difference between the teacher's class names and the data's (in order)."""
    if names is None:
        return
    if len(names) != len(data_names):
        raise KDError(f"{where} lists {len(names)} class names, the dataset has {len(data_names)} classes")
    for index, (ours, theirs) in enumerate(zip(names, data_names)):
        if ours != theirs:
            raise KDError(
                f"teacher class {index} is {ours!r} ({where}) but the dataset's class {index} is {theirs!r}: "
                "the teacher's classes or their order differ from the dataset's"
            )


def teacher_rows(
    names: Sequence[str] | None, num_classes: int, data_names: Sequence[str], where: str, teacher: str
) -> list[int] | None:
    """The teacher's outputs that give the data's classes, in the data's order; None: all of them, as they are.

    `names`: the teacher's class names (from `where`), if known; `num_classes`: its output count. Any
    misfit is a one-line `KDError` (`teacher` names the network in it).
    """
    data_names = list(data_names)
    if names is None:
        if num_classes == len(data_names):
            return None
        advice = (f"pass --teacher-classes FILE naming the teacher's {num_classes} classes (one per line, in output order) "
                  "to use the dataset's classes among them" if num_classes > len(data_names)
                  else "use weights trained for this dataset's classes (or a superset of them)")
        raise KDError(f"teacher {teacher} outputs {num_classes} classes, the dataset has {len(data_names)}: {advice}")
    names = list(names)
    if len(names) != num_classes:
        raise KDError(f"{where} lists {len(names)} class names, but teacher {teacher} outputs {num_classes} classes")
    if names == data_names:
        return None
    if len(names) == len(data_names) and set(names) != set(data_names):
        check_teacher_class_names(names, data_names, where)  # names the first difference, by position
    counts = Counter(names)
    missing = next((name for name in data_names if name not in counts), None)
    if missing is not None:
        raise KDError(
            f"the dataset's class {missing!r} is not among the teacher's {num_classes} classes ({where}): "
            "they must include all the dataset's classes"
        )
    twice = next((name for name in data_names if counts[name] > 1), None)
    if twice is not None:
        raise KDError(f"{where} names class {twice!r} more than once: which of the teacher's outputs is it?")
    index = {name: row for row, name in enumerate(names)}
    return [index[name] for name in data_names]


@dataclass
class PretrainedTeacher:
    """A pretrained teacher read and checked before any data is: its name, input, weights, class names, and the
    class count its weights give (None where the file has no classifier tensor: loading it names what is missing)."""

    spec: ModelSpec
    input: InputConfig  # its channels are the weights file's
    weights: WeightsFile
    class_names: list[str] | None
    class_names_from: str  # where the names came from, for error messages
    num_classes: int | None = None

    def record(self) -> dict[str, Any]:
        """What config.json and C-matrix provenance record about the teacher."""
        record = {
            "teacher_model": self.spec.display,
            "teacher_weights": str(self.weights.path.expanduser().resolve()),
            "teacher_weights_sha256": self.weights.sha256,
            "teacher_input": self.input.to_dict(),
        }
        if self.num_classes is not None:
            record["teacher_num_classes"] = self.num_classes
        return record

    def build(self, data: ImageDataset) -> Teacher:
        """The network with its weights, behind an adapter from `data`'s batches, its logits restricted to (or
        re-ordered as) `data`'s classes where its own are more (or in another order)."""
        num_classes = self.num_classes if self.num_classes is not None else data.num_classes
        channels = self.input.channels
        if channels != data.channels and {channels, data.channels} != {1, 3}:
            raise KDError(
                f"teacher {self.spec.display} takes {channels}-channel images, the dataset has {data.channels} channels: "
                "only gray <-> RGB is converted"
            )
        net = _build_network(self.spec, num_classes, channels)
        _load_weights(net, self.weights, self.spec)
        rows = teacher_rows(self.class_names, num_classes, data.class_names, self.class_names_from,
                            f"{self.spec.display} ({self.weights.path})")
        _dry_forward(net, self.spec, self.input, num_classes)
        adapted = AdaptedTeacher(TeacherInput(data.mean, data.std, self.input), net.eval(), rows)
        record = self.record()
        if num_classes == data.num_classes:  # a shared file records the teacher's class count where it was restricted
            record.pop("teacher_num_classes", None)
        return Teacher(net=adapted.eval(), model=self.spec.display, record=record)


def _dry_forward(net: nn.Module, spec: ModelSpec, config: InputConfig, num_classes: int) -> None:
    """Two blank images through the network: a size it cannot take fails here, in one line."""
    height, width = config.size
    net.eval()
    try:
        with torch.no_grad():
            output = net(torch.zeros(2, config.channels, height, width))
    except Exception as error:  # noqa: BLE001 - any failure means the network does not take this input
        raise KDError(
            f"teacher {spec.display} cannot run on {config.channels}x{height}x{width} inputs "
            f"({one_line(error, 120)}); pass --teacher-image-size N with a size it takes"
        ) from None
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, num_classes):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise KDError(f"teacher {spec.display} gives outputs {shape} for 2 images, not logits of shape (2, {num_classes})")


def check_pretrained_flags(
    model: str | None, weights: str | None, image_size: int | None = None, classes_file: str | None = None
) -> None:
    """A one-line `KDError` for --teacher-model without --teacher-weights, or its other flags without it."""
    if model is not None and weights is None:
        raise KDError("--teacher-model needs --teacher-weights FILE (its weights; nothing is downloaded)")
    given = [flag for flag, value in (("--teacher-weights", weights), ("--teacher-image-size", image_size),
                                      ("--teacher-classes", classes_file)) if value is not None]
    if model is None and given:
        raise KDError(f"{given[0]} belongs to --teacher-model NAME, which was not given")


def load_pretrained_teacher(
    model: str, weights: str | os.PathLike, image_size: int | None = None, classes_file: str | os.PathLike | None = None
) -> PretrainedTeacher:
    """Parse the model name and read its weights (and class names); `.build(data)` makes the `Teacher`."""
    spec = parse_teacher_model(model)
    input_config = teacher_input_config(spec, image_size)
    read = read_weights_file(weights, "--teacher-weights")
    num_classes, channels = file_layout(spec, read)
    input_config = with_channels(input_config, channels)
    if classes_file is not None:
        names, names_from = read_class_names_file(classes_file), f"--teacher-classes {classes_file}"
    else:
        names, names_from = read.class_names, f"--teacher-weights {weights}"
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise KDError(f"{names_from} lists {len(names)} class names, but teacher {spec.display} ({weights}) "
                      f"outputs {num_classes} classes")
    return PretrainedTeacher(spec, input_config, read, names, names_from, num_classes)
