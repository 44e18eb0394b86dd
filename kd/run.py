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

from accelerate.utils import set_seed

import kd
from kd.datasets import ImageDataset, load_dataset
from kd.engine import FitConfig, TrainModule, fit, make_accelerator, optimizer_steps_per_epoch
from kd.errors import KDError
from kd.io import write_json_atomic
from kd.methods import ExportInfo, Method, all_param_names
from kd.models import build_model
from kd.rundir import CONFIG_FILE, METRICS_FILE, MODEL_FILE, latest_checkpoint, prepare_run_dir, read_run_config, save_model


@dataclass
class RunConfig:
    """Flags every stage shares (names match the command-line flags)."""

    out: str
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    skip_bad_images: bool = False
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
    method: str | None = None  # None: the stage's default
    # Method parameters as given (None or False: not given); resolved against the method's
    # declaration, and recorded resolved in config.json.
    method_params: dict[str, Any] = field(default_factory=dict)


# config.json keys that must match for `--resume` to continue the same run: anything that
# changes the model, the data, the targets, the schedule or the random streams; and every
# method parameter.
RESUME_KEYS = (
    "stage", "model", "dataset", "dataset_name", "num_classes", "class_names", "in_channels", "image_size",
    "method", "mode", "proxy", "teacher",
    "seed", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "mixed_precision", "world_size",
    *all_param_names(),
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
    if config.grad_accum < 1:
        raise KDError(f"--grad-accum must be a positive integer, got {config.grad_accum}")
    for flag, value in (("--checkpoint-every", config.checkpoint_every), ("--checkpoint-every-steps", config.checkpoint_every_steps)):
        if value is not None and value < 1:
            raise KDError(f"{flag} must be a positive integer, got {value}")
    if config.resume and config.overwrite:
        raise KDError("--resume continues the run in --out and --overwrite replaces it: pass one of them")


def check_resume_config(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """A one-line `KDError` naming the first flag whose value differs from the run being resumed."""
    new = json.loads(json.dumps(new))  # compare as config.json holds it (tuples become lists)
    for key in RESUME_KEYS:
        if key in old and key in new and old[key] != new[key]:
            flag = "processes (world size)" if key == "world_size" else f"--{key.replace('_', '-')}"
            raise KDError(
                f"--resume: {flag} is {_short(new[key])} but the run in {out} used {_short(old[key])}; "
                "pass the original flags, or start a new run with another --out"
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def run_stage(
    stage: str,
    config: RunConfig,
    extra_config: dict[str, Any],
    make_method: Callable[[ImageDataset], Method],
) -> Path:
    """Train `config.model` on `config.dataset` with the stage's method; write the run directory.

    `make_method` builds the method once the data is known (class count and names); the
    method's parameters must already be resolved and checked, so bad flags fail before any
    data is read.
    """
    check_run_config(config)
    accelerator = make_accelerator(config.mixed_precision, config.grad_accum)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would accept it and silently train in float32.
        raise KDError("--mixed-precision fp16 needs a GPU; use bf16 on the CPU")
    out = prepare_run_dir(config.out, config.overwrite, config.resume) if accelerator.is_main_process else Path(config.out)
    accelerator.wait_for_everyone()
    resume_from = latest_checkpoint(out) if config.resume else None
    set_seed(config.seed)

    data = load_dataset(config.dataset, config.data_dir, download=config.download, image_size=config.image_size,
                        skip_bad_images=config.skip_bad_images)
    for note in data.notes:
        accelerator.print(note)
    # The student is built before the method so a teacher's construction does not shift the
    # random stream: the same seed gives the same initial student with every method.
    net = build_model(config.model, data.num_classes, data.channels, data.image_size)
    method = make_method(data)
    card = {"stage": stage, **method.card()}
    optimizer_steps_per_epoch(len(data.train), config.batch_size, accelerator.num_processes, config.grad_accum)
    flags = {key: value for key, value in asdict(config).items() if key != "method_params"}
    run_config = {
        **flags,
        **extra_config,
        **card,
        "dataset_name": data.name,
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
    if resume_from is not None:
        # The original config.json stays; it must describe the same run.
        check_resume_config(out, read_run_config(out), run_config)
        accelerator.print(f"{data.describe()} | {stage} {config.model} | resuming from {resume_from}")
    elif accelerator.is_main_process:
        write_json_atomic(out / CONFIG_FILE, run_config)
        accelerator.print(f"{data.describe()} | {stage} {config.model} | {card.get('method', '')} -> {out}")

    fit_config = FitConfig(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        weight_decay=config.weight_decay, seed=config.seed, max_steps=config.max_steps,
        run_dir=str(out), checkpoint_every_epochs=config.checkpoint_every,
        checkpoint_every_steps=config.checkpoint_every_steps,
        resume_from=str(resume_from) if resume_from is not None else None,
    )
    result = fit(TrainModule(net, method), data, fit_config, accelerator, desc=stage)

    if accelerator.is_main_process:
        save_model(out / MODEL_FILE, net)
        method.export(out, ExportInfo(
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
        write_json_atomic(out / METRICS_FILE, metrics)
        accelerator.print(
            f"test top-1 {result.metrics['test_top1']:.4f}  NLL {result.metrics['test_nll']:.4f}  "
            f"ECE {result.metrics['test_ece']:.4f}  in {result.train_seconds:.1f}s "
            f"({result.images_per_second:.0f} img/s) -> {out}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out
