"""Every run setting, declared once.

A `Setting` is one flag of `kd train-teacher` and `kd distill`: its name (the config.json key,
the flag `--name-with-dashes` and the attribute of `Settings`), type, default, help, check,
and whether `--resume` compares it. The click options (`lspp_kd.cli.options`), config.json,
the resume keys and what the training loop receives (`Settings`) all come from the
declarations below, as method parameters come from the method registry (`kd.methods`).

Adding a flag is one `Setting(...)` here (or in a stage's own list, like the student's
teacher flags) plus the code that uses `settings.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Iterable

from kd.data.augment import AugmentOptions
from kd.data.datasets import DATASET_NAMES
from kd.errors import KDError
from kd.methods.base import Param
from kd.models.networks import BUILTIN_MODELS

# The augmentation parameters' defaults live in `AugmentOptions`; the flags say "not given" (None).
_AUGMENT_DEFAULTS = {f.name: f.default for f in fields(AugmentOptions)}


@dataclass(frozen=True)
class Setting(Param):
    """One run setting: a flag, a config.json key, an attribute of `Settings`.

    A method parameter (`Param`: name, default, help, type, choices, check) plus what a run
    flag also says about itself.
    """

    type: type = str  # int, float, str or bool (a bool is an on/off flag)
    metavar: str | None = None
    resume: bool = False  # `--resume` refuses a value other than the run's own
    path: str | None = None  # "dir", "file" or "any": a path flag
    required: bool = False
    negatable: bool = False  # a bool flag with a --no-... form (default True)
    augment: bool = False  # an augmentation parameter: config.json records it resolved, in "augment_options"
    # `--config RUN/config.json` takes it from that run (False: where and how that run was written, not what it trains).
    rerun: bool = True


def _positive_int(name: str, default: int | None, help: str, **kwargs: Any) -> Setting:
    return Setting(name, default, help, type=int, valid=lambda v: v >= 1, rule="a positive integer", **kwargs)


DATASET_HELP = (
    "digits (built in, the default), cifar10, cifar100, mnist, fashionmnist, svhn (torchvision, "
    "read from --data-dir), or imagefolder (--data-dir holding train/<class>/* and test/<class>/* or val/<class>/*)."
)
assert all(name in DATASET_HELP for name in DATASET_NAMES)

# The settings both training commands share, in the order `--help` lists them.
RUN_SETTINGS: tuple[Setting, ...] = (
    Setting("dataset", "digits", DATASET_HELP, resume=True),
    Setting("data_dir", None, "Dataset root (torchvision datasets, imagefolder).", path="dir"),
    Setting("download", False, "Let torchvision download the dataset into --data-dir if it is missing.", type=bool),
    _positive_int(
        "train_per_class", None,
        "Train on N images per class only: a stratified subset picked with --seed (the test split stays whole). "
        "For small-data experiments and quick runs.", metavar="N", resume=True,
    ),
    Setting(
        "val_split", None,
        "Hold out this fraction of every class's training images (stratified, picked with --seed) as a validation "
        "split, evaluated every --eval-every epochs and at the end. The test split is evaluated once, at the end.",
        type=float, metavar="FRACTION", valid=lambda v: 0.0 < v < 1.0, rule="a fraction between 0 and 1 (exclusive)",
        resume=True,
    ),
    _positive_int(
        "eval_every", None, "With --val-split: validate every EPOCHS epochs (and after the last). Default: every epoch.",
        metavar="EPOCHS",
    ),
    Setting(
        "log_with", None,
        "Also log each epoch's scalars (summary.csv's columns) to these Accelerate trackers, comma-separated: "
        "tensorboard (into OUT/tensorboard; pip install 'lspp-kd[tensorboard]'), wandb, mlflow, comet_ml, aim, ...",
        metavar="TRACKERS",
    ),
    Setting(
        "channels_last", True,
        "Train convolutional networks in channels-last (NHWC) memory format, the faster layout for oneDNN and "
        "cuDNN (measured: the paper's AlexNet step about 5-10% faster on a 2-core CPU). Results agree to float tolerance.",
        type=bool, negatable=True,
    ),
    Setting(
        "compile", False,
        "torch.compile the network. Compiling takes about 30 s on a 2-core CPU for the paper's AlexNet and "
        "gained about 6% per step there, so it is off by default; it pays on long runs and on GPUs. Dropout masks "
        "then come from the compiler's own generator: a compiled run repeats itself but not an uncompiled one.",
        type=bool,
    ),
    Setting(
        "num_workers", None,
        "DataLoader worker processes that read and decode streamed images (ImageFolder trees too large to hold in "
        "memory); 0 reads them in the training process. In-memory data needs none. Default: min(4, CPU cores).",
        type=int, metavar="N", valid=lambda v: v >= 0, rule="a whole number >= 0",
    ),
    Setting(
        "skip_bad_images", False,
        "imagefolder: leave out images that cannot be read (counted in metrics.json) instead of stopping with an error naming the first.",
        type=bool,
    ),
    Setting(
        "model", "small_cnn",
        f"{', '.join(BUILTIN_MODELS)}, any timm model name (timm:NAME), or tv:NAME (a torchvision classification "
        "model). Random init unless --pretrained or --pretrained-path.", resume=True,
    ),
    Setting(
        "pretrained", False,
        "Start --model from its published weights (timm: the Hugging Face hub; tv:NAME: torchvision's), downloaded "
        "and cached by that library; the only time kd uses the network. The model then sees images at its own input "
        "size (unless --image-size) normalised with its own mean and std. Offline: use --pretrained-path.",
        type=bool, resume=True,
    ),
    Setting(
        "pretrained_path", None,
        "Start --model from a weights file: safetensors (a kd run's model.safetensors too) or a PyTorch state dict "
        "(also inside a checkpoint dict). Adapted as timm adapts pretrained weights: the classifier is "
        "re-initialised for other classes (rows picked by name when the file names a superset), the first "
        "convolution adapted to the data's channels; any other mismatch is an error naming the tensor.",
        path="file", metavar="FILE",
    ),
    _positive_int("epochs", 30, "Training epochs.", resume=True),
    _positive_int("batch_size", 64, "Batch size per process.", resume=True),
    Setting("lr", 0.05, "Peak learning rate (SGD, Nesterov momentum 0.9, warm-up + cosine).", type=float,
            valid=lambda v: v > 0, rule="positive", resume=True),
    Setting(
        "layer_decay", None,
        "Layer-wise learning-rate decay for fine-tuning (timm's): each layer group learns at lr x DECAY^(groups above "
        "it), the classifier and the C logits at the full rate. timm models group their own layers; others by timm's "
        "automatic grouping. Typical: 0.65-0.75 for ViTs.", type=float, metavar="DECAY",
        valid=lambda v: 0.0 < v <= 1.0, rule="in (0, 1]", resume=True,
    ),
    Setting(
        "head_only_epochs", None,
        "Linear probe, then fine-tune: for the first N epochs only the classifier (and the method's own parameters, "
        "the C logits) learn; the body's weights and BatchNorm statistics stay as they started. Then everything "
        "learns. For --pretrained / --pretrained-path runs whose new classifier would disturb the body at first.",
        type=int, metavar="N", valid=lambda v: v >= 0, rule="a whole number >= 0", resume=True,
    ),
    Setting("weight_decay", 5e-4, "Weight decay (not on biases, norms or the C logits).", type=float,
            valid=lambda v: v >= 0, rule=">= 0", resume=True),
    Setting("seed", 0, "Random seed (initialisation, shuffling, augmentation).", type=int, resume=True),
    _positive_int("max_steps", None, "Stop after this many optimizer steps (smoke runs, benchmarks).", resume=True),
    Setting("image_size", None, "Side length the model sees (default: the dataset's own size).", type=int,
            valid=lambda v: v >= 1, rule="a positive integer", resume=True),
    Setting("out", None, "Run directory to create (weights, config.json, metrics.json, ...).", path="any",
            required=True, rerun=False),
    Setting("overwrite", False, "Replace the run in an existing non-empty --out.", type=bool, rerun=False),
    Setting(
        "mixed_precision", None,
        "Passed to Accelerate; losses and the C-matrix stay in float32. fp16 needs a GPU; bf16 also runs on the CPU. "
        "Default: what `accelerate launch --mixed_precision` (or its config file) says, else no; config.json records the value used.",
        choices=("no", "fp16", "bf16"), resume=True,
    ),
    _positive_int(
        "grad_accum", 1,
        "Gradient accumulation: one optimizer step per N batches, i.e. an effective batch of "
        "batch-size x N x processes. The schedule, --max-steps and checkpoint steps count optimizer steps.",
        resume=True,
    ),
    _positive_int(
        "checkpoint_every", None,
        "Save the full training state (model, C logits, optimizer, schedule, RNG, position) to "
        "OUT/checkpoints/step-NNNNNNNN every EPOCHS epochs and at the end; the last 2 are kept.", metavar="EPOCHS",
    ),
    _positive_int(
        "checkpoint_every_steps", None, "Also (or instead) save a checkpoint every STEPS optimizer steps, mid-epoch included.",
        metavar="STEPS",
    ),
    Setting(
        "augment", None,
        "Training augmentations, comma-separated: crop (reflect-pad and random crop; a random-resized crop "
        "for streamed data), flip (horizontal), randaugment, then (on normalised images) cutout, mixup, cutmix, each "
        "group in the order given; none for nothing. Default: crop,flip for cifar10/100, fashionmnist and imagefolder; "
        "crop for digits, mnist and svhn. Do not flip digits, text or anything whose orientation carries meaning.",
        metavar="LIST", resume=True,
    ),
    Setting("crop_padding", None, "crop: padding in pixels. Default: image size / 8.", type=int, augment=True),
    Setting("cutout_size", None, "cutout: side of the zeroed square. Default: image size / 2.", type=int, augment=True),
    Setting("randaugment_n", None, f"randaugment: ops per image. Default: {_AUGMENT_DEFAULTS['randaugment_n']}.",
            type=int, augment=True),
    Setting("randaugment_m", None, f"randaugment: magnitude, 0-30. Default: {_AUGMENT_DEFAULTS['randaugment_m']}.",
            type=int, augment=True),
    Setting("mixup_alpha", None, f"mixup: Beta(a, a) parameter. Default: {_AUGMENT_DEFAULTS['mixup_alpha']}.",
            type=float, augment=True),
    Setting("cutmix_alpha", None, f"cutmix: Beta(a, a) parameter. Default: {_AUGMENT_DEFAULTS['cutmix_alpha']}.",
            type=float, augment=True),
    Setting(
        "mix_switch_prob", None,
        f"With both mixup and cutmix: the probability that a batch uses cutmix. Default: {_AUGMENT_DEFAULTS['mix_switch_prob']}.",
        type=float, augment=True,
    ),
    Setting(
        "resume", False,
        "Continue the run in an existing --out from its latest complete checkpoint (same flags as the original run).",
        type=bool, rerun=False,
    ),
)


def settings_class(name: str, declared: Iterable[Setting], base: type | None = None) -> type:
    """A dataclass with one field per declaration (its default), after `base`'s; `DECLARED` lists them all.

    Without a base it also holds the chosen method and its parameters, which the method
    registry declares (`kd.methods`).
    """
    declared = tuple(declared)
    own = [(s.name, s.type | None, field(default=s.default)) for s in declared]
    if base is None:
        own += [
            ("method", str | None, field(default=None)),  # None: the stage's default
            # Method parameters as given (None or False: not given), resolved against the method's declaration.
            ("method_params", dict[str, Any], field(default_factory=dict)),
        ]
    everything = (*(base.DECLARED if base else ()), *declared)
    return make_dataclass(name, own, bases=(base,) if base else (), namespace={"__module__": __name__, "DECLARED": everything})


# What a training run receives, flags as attributes: `settings.epochs`, `settings.lr`, ...
Settings = settings_class("Settings", RUN_SETTINGS)


def declarations(settings: Any) -> tuple[Setting, ...]:
    """The declarations behind a settings object (a stage's own after the shared ones)."""
    return type(settings).DECLARED


def check_settings(settings: Any) -> None:
    """Cheap checks before any data is read, each a one-line `KDError`."""
    for setting in declarations(settings):
        setting.check(getattr(settings, setting.name))
    if settings.pretrained and settings.pretrained_path is not None:
        raise KDError("--pretrained and --pretrained-path both say where --model's weights come from: pass one")
    if settings.eval_every is not None and settings.val_split is None:
        raise KDError("--eval-every evaluates on the validation split: pass --val-split FRACTION too (the test split is used only at the end)")
    trackers(settings.log_with)


def recorded(settings: Any) -> dict[str, Any]:
    """The flag values config.json records (augmentation parameters are recorded resolved, elsewhere)."""
    return {s.name: getattr(settings, s.name) for s in declarations(settings) if not s.augment}


def augment_params(settings: Any) -> dict[str, Any]:
    """The augmentation parameters given (None: not given)."""
    return {s.name: getattr(settings, s.name) for s in declarations(settings) if s.augment and getattr(settings, s.name) is not None}


def resume_keys(settings: Any, derived: Iterable[str]) -> tuple[str, ...]:
    """config.json keys `--resume` compares: the declared settings that say so, `derived` keys, every method parameter."""
    from kd.methods import all_param_names

    return (*(s.name for s in declarations(settings) if s.resume), *derived, *all_param_names())


def from_flags(cls: type, options: dict[str, Any], method_param_names: Iterable[str]) -> Any:
    """A settings object from click's flat options: method parameters go into `method_params`."""
    options = dict(options)
    method_params = {name: options.pop(name) for name in method_param_names if name in options}
    return cls(**options, method_params=method_params)


def trackers(log_with: str | None) -> list[str]:
    """The trackers `--log-with` names, each known to Accelerate and installed; else a one-line `KDError`."""
    if not log_with:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [name.strip().lower() for name in log_with.split(",") if name.strip()]
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise KDError(f"--log-with: unknown tracker {name!r}; Accelerate knows {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if name not in available:
            extra = "pip install 'lspp-kd[tensorboard]'" if name == "tensorboard" else f"install the {name} package"
            raise KDError(f"--log-with {name}: the {name} package is not installed ({extra})")
    return list(dict.fromkeys(names))

