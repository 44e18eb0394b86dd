"""One way to run a stage: accelerator, run directory, data, model, engine, artifacts.

The teacher and student stages differ only in the method (`kd.methods`) they hand to
`run_stage`; everything else, including which files land in the run directory and what
`config.json` and `metrics.json` hold, is shared here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn

import kd
from kd.augment import AugmentOptions, check_augment, default_augment, makes_soft_labels, parse_augment
from kd.datasets import ImageDataset, dataset_key, load_dataset, train_per_class, validation_split
from kd.engine import FitConfig, TrainingDiverged, TrainModule, fit, make_accelerator, optimizer_steps_per_epoch
from kd.errors import KDError, one_line
from kd.fingerprint import data_fingerprint
from kd.loader import DeviceBatches
from kd.io import write_json_atomic
from kd.methods import ExportInfo, Method, all_param_names, soft_target_methods
from kd.models import build_model
from kd.rundir import (
    CONFIG_FILE, METRICS_FILE, MODEL_FILE, STATUS_FILE, TENSORBOARD_DIR, abandon_run_dir, check_out, finish_run_dir, latest_checkpoint,
    prepare_run_dir, read_run_config, save_model, work_dir,
)


@dataclass
class RunConfig:
    """Flags every stage shares (names match the command-line flags)."""

    out: str
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    skip_bad_images: bool = False
    train_per_class: int | None = None  # a seeded, stratified subset of the training split (small-data runs)
    val_split: float | None = None  # a seeded, stratified validation split carved out of train
    eval_every: int | None = None  # epochs between validations (needs val_split; default every epoch)
    log_with: str | None = None  # Accelerate trackers, comma-separated ("tensorboard", "wandb", ...)
    channels_last: bool = True  # convolutional networks in NHWC memory format (speed only)
    compile: bool = False  # torch.compile the network (speed only; compiling takes a while)
    model: str = "small_cnn"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0
    max_steps: int | None = None
    image_size: int | None = None
    mixed_precision: str = "no"
    overwrite: bool = False
    grad_accum: int = 1
    checkpoint_every: int | None = None  # epochs
    checkpoint_every_steps: int | None = None  # optimizer steps
    resume: bool = False
    augment: str | None = None  # "crop,flip,..."; None: the dataset's default
    # Augmentation parameters as given (None: `AugmentOptions`' default).
    augment_params: dict[str, Any] = field(default_factory=dict)
    method: str | None = None  # None: the stage's default
    # Method parameters as given (None or False: not given); resolved against the method's
    # declaration, and recorded resolved in config.json.
    method_params: dict[str, Any] = field(default_factory=dict)


# config.json keys that must match for `--resume` to continue the same run: anything that
# changes the model, the data, the targets, the schedule or the random streams; and every
# method parameter.
RESUME_KEYS = (
    "stage", "model", "dataset", "dataset_name", "num_classes", "class_names", "in_channels", "image_size",
    "method", "mode", "proxy", "teacher", "teacher_model", "teacher_weights_sha256", "augment", "augment_options",
    "train_per_class", "val_split",
    "seed", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "mixed_precision", "world_size",
    "data_fingerprint", *all_param_names(),
)


def check_run_config(config: RunConfig) -> None:
    """Cheap checks before any data is read, each a one-line `KDError`."""
    for flag, value in (("--epochs", config.epochs), ("--batch-size", config.batch_size)):
        if value < 1:
            raise KDError(f"{flag} must be a positive integer, got {value}")
    if config.max_steps is not None and config.max_steps < 1:
        raise KDError(f"--max-steps must be a positive integer, got {config.max_steps}")
    if config.lr <= 0:
        raise KDError(f"--lr must be positive, got {config.lr}")
    if config.weight_decay < 0:
        raise KDError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if config.train_per_class is not None and config.train_per_class < 1:
        raise KDError(f"--train-per-class must be a positive integer, got {config.train_per_class}")
    if config.grad_accum < 1:
        raise KDError(f"--grad-accum must be a positive integer, got {config.grad_accum}")
    for flag, value in (("--checkpoint-every", config.checkpoint_every), ("--checkpoint-every-steps", config.checkpoint_every_steps)):
        if value is not None and value < 1:
            raise KDError(f"{flag} must be a positive integer, got {value}")
    if config.val_split is not None and not 0.0 < config.val_split < 1.0:
        raise KDError(f"--val-split must be a fraction between 0 and 1 (exclusive), got {config.val_split}")
    if config.eval_every is not None:
        if config.eval_every < 1:
            raise KDError(f"--eval-every must be a positive integer, got {config.eval_every}")
        if config.val_split is None:
            raise KDError("--eval-every evaluates on the validation split: pass --val-split FRACTION too (the test split is used only at the end)")
    trackers(config.log_with)
    if config.resume and config.overwrite:
        raise KDError("--resume continues the run in --out and --overwrite replaces it: pass one of them")


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


def _start_trackers(accelerator: Any, work: Path, run_config: dict[str, Any]) -> None:
    """Point Accelerate's trackers at the run directory and log the run's scalar settings."""
    accelerator.project_configuration.logging_dir = str(work)
    scalars = {key: value for key, value in run_config.items() if isinstance(value, (int, float, str, bool))}
    accelerator.init_trackers(TENSORBOARD_DIR, config=scalars, init_kwargs={"tensorboard": {"flush_secs": 10}})


# Keys that are not flags themselves: a mismatch names the flag that decides them.
_DECIDED_BY = {
    "dataset_name": "--data-dir", "data_fingerprint": "--data-dir", "num_classes": "--data-dir",
    "class_names": "--data-dir", "in_channels": "--data-dir", "world_size": "processes (world size)",
}


def check_resume_config(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """A one-line `KDError` naming the first flag whose value differs from the run being resumed."""
    new = json.loads(json.dumps(new))  # compare as config.json holds it (tuples become lists)
    for key in RESUME_KEYS:
        if key in old and key in new and old[key] != new[key]:
            flag = _DECIDED_BY.get(key, f"--{key.replace('_', '-')}")
            what = "gives other data" if flag == "--data-dir" and key != "dataset_name" else f"is {_short(new[key])}"
            raise KDError(
                f"--resume: {flag} {what} but the run in {out} used {_short(old[key])}; "
                "pass the original flags, or start a new run with another --out"
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def augment_options(config: RunConfig, method_cls: type[Method]) -> AugmentOptions:
    """The run's augmentations (the flags, or the dataset's default), checked before any data is read.

    Values that depend on the image size are checked again once the data is known.
    """
    names = parse_augment(config.augment) if config.augment is not None else default_augment(dataset_key(config.dataset))
    options = AugmentOptions(names, **{key: value for key, value in config.augment_params.items() if value is not None})
    check_augment(options, config.image_size or 1 << 20)
    if makes_soft_labels(options) and not method_cls.soft_targets:
        raise KDError(
            f"--method {method_cls.name} takes class labels only, and --augment {','.join(names)} makes label "
            f"distributions (mixup, cutmix): drop those, or use a method that takes them ({', '.join(soft_target_methods())})"
        )
    return options


def dry_forward(net: nn.Module, data: ImageDataset, model: str) -> None:
    """Run the network on two training images: a model that cannot take the data fails here, in one line."""
    images, _, _ = next(iter(DeviceBatches(data, "train", min(2, len(data.train)), torch.device("cpu"), training=False, num_workers=0)))
    net.eval()
    try:
        with torch.no_grad():
            shape = tuple(net(images).shape)
    except Exception as error:  # noqa: BLE001 - any failure here means the model does not fit the data
        raise KDError(
            f"model {model} cannot run on {data.channels}x{data.image_size}x{data.image_size} images "
            f"({one_line(error, 160)}); pass --image-size N with a size it takes"
        ) from None
    finally:
        net.train()
    if shape != (len(images), data.num_classes):
        raise KDError(f"model {model} gives outputs of shape {shape} for {len(images)} images, not ({len(images)}, {data.num_classes})")


def run_stage(
    stage: str,
    config: RunConfig,
    extra_config: dict[str, Any],
    method_cls: type[Method],
    make_method: Callable[[ImageDataset], Method],
) -> Path:
    """Train `config.model` on `config.dataset` with the stage's method; write the run directory.

    `make_method` builds the method once the data is known (class count and names); the
    method's parameters must already be resolved and checked, so bad flags fail before any
    data is read.
    """
    check_run_config(config)
    accelerator = make_accelerator(config.mixed_precision, config.grad_accum, trackers(config.log_with), config.out)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would accept it and silently train in float32.
        raise KDError("--mixed-precision fp16 needs a GPU; use bf16 on the CPU")
    # Every check runs before --out is touched: flags, out, data, model, method (teacher,
    # C-matrix), a forward pass; a failure leaves an existing run as it was.
    out = check_out(config.out, config.overwrite, config.resume)
    augment = augment_options(config, method_cls)
    set_seed(config.seed)
    data = load_dataset(config.dataset, config.data_dir, download=config.download, image_size=config.image_size,
                        skip_bad_images=config.skip_bad_images)
    if config.train_per_class is not None:
        data = train_per_class(data, config.train_per_class, config.seed)
    if config.val_split is not None:
        data = validation_split(data, config.val_split, config.seed)
    for note in data.notes:
        accelerator.print(note)
    # The student is built before the method so a teacher's construction does not shift the
    # random stream: the same seed gives the same initial student with every method.
    net = build_model(config.model, data.num_classes, data.channels, data.image_size)
    method = make_method(data)
    check_augment(augment, data.image_size)
    dry_forward(net, data, config.model)
    card = {"stage": stage, **method.card()}
    optimizer_steps_per_epoch(len(data.train), config.batch_size, accelerator.num_processes, config.grad_accum)
    flags = {key: value for key, value in asdict(config).items() if key not in ("method_params", "augment_params")}
    if config.data_dir is not None:
        flags["data_dir"] = str(Path(config.data_dir).expanduser().resolve())
    run_config = {
        **flags,
        **extra_config,
        **card,
        "augment": list(augment.names),
        "augment_options": augment.resolved(data.image_size, streaming=not data.in_memory),
        "dataset_name": data.name,
        "data_fingerprint": data_fingerprint(data, config.dataset, config.data_dir),
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "in_channels": data.channels,
        "image_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
        "world_size": accelerator.num_processes,
        "effective_batch_size": config.batch_size * config.grad_accum * accelerator.num_processes,
        "toolkit_version": kd.__version__,
    }
    if config.resume:
        # The original config.json stays; it must describe the same run.
        check_resume_config(out, read_run_config(work_dir(out, resume=True)), run_config)

    work = [prepare_run_dir(out, config.overwrite, config.resume) if accelerator.is_main_process else None]
    work = Path(broadcast_object_list(work)[0])
    resume_from = latest_checkpoint(work) if config.resume else None
    if resume_from is not None:
        accelerator.print(f"{data.describe()} | {stage} {config.model} | resuming from {resume_from}")
    elif accelerator.is_main_process:
        write_json_atomic(work / CONFIG_FILE, run_config)
        staged = f" (staged in {work} until it finishes)" if work != out else ""
        accelerator.print(f"{data.describe()} | {stage} {config.model} | {card.get('method', '')} -> {out}{staged}")
    if config.log_with:
        _start_trackers(accelerator, work, run_config)

    fit_config = FitConfig(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        weight_decay=config.weight_decay, seed=config.seed, max_steps=config.max_steps,
        run_dir=str(work), checkpoint_every_epochs=config.checkpoint_every,
        checkpoint_every_steps=config.checkpoint_every_steps,
        resume_from=str(resume_from) if resume_from is not None else None,
        augment=augment, eval_every=config.eval_every, channels_last=config.channels_last, compile=config.compile,
    )
    try:
        result = fit(TrainModule(net, method), data, fit_config, accelerator, desc=stage)
    except TrainingDiverged as error:
        if accelerator.is_main_process:
            if work == out:
                write_json_atomic(out / STATUS_FILE, {"status": "diverged", "step": error.step, "loss": str(error.loss)})
            abandon_run_dir(work, out)
        raise

    if accelerator.is_main_process:
        save_model(work / MODEL_FILE, net)
        method.export(work, ExportInfo(
            class_names=tuple(data.class_names), dataset=data.name, model=config.model,
            test_top1=result.metrics.get("test_top1"),
        ))
        metrics = {
            **card,
            "model": config.model,
            **result.metrics,
            "epochs": result.epochs,
            "steps": result.steps,
            "train_seconds": result.train_seconds,
            "seconds_per_epoch": result.train_seconds / max(result.epochs, 1),
            "images_per_second": result.images_per_second,
            "peak_memory_mb": result.peak_memory_mb,
            "peak_memory_kind": result.peak_memory_kind,
            **result.method_metrics,
            "epoch_train_loss": result.epoch_train_loss,
            "epoch_loss_parts": result.epoch_loss_parts,
            "num_classes": data.num_classes,
            "class_names": list(data.class_names),
            "world_size": accelerator.num_processes,
            "grad_accum": result.grad_accum,
            "effective_batch_size": result.effective_batch_size,
            "skipped_images": data.skipped_images,
            "resumed_from_step": result.resumed_from_step,
            "mixed_precision": config.mixed_precision,
            "device": str(accelerator.device),
        }
        write_json_atomic(work / METRICS_FILE, metrics)
        finish_run_dir(work, out)
        val = f"val top-1 {result.metrics['val_top1']:.4f}  " if "val_top1" in result.metrics else ""
        accelerator.print(
            f"{val}test top-1 {result.metrics['test_top1']:.4f}  NLL {result.metrics['test_nll']:.4f}  "
            f"ECE {result.metrics['test_ece']:.4f}  in {result.train_seconds:.1f}s "
            f"({result.images_per_second:.0f} img/s) -> {out}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out
