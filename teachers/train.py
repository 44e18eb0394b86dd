"""Teacher stage: train a classifier with 1-hot, LS or LS++ targets and export its C-matrix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

import kd
from kd.cmatrix import CMatrix, save_cmatrix
from kd.datasets import load_dataset
from kd.engine import FitConfig, TrainModule, fit
from kd.errors import KDError
from kd.io import write_json_atomic
from kd.lspp import LSPPLoss
from kd.models import build_model
from kd.rundir import CMATRIX_FILE, CONFIG_FILE, METRICS_FILE, MODEL_FILE, prepare_run_dir, save_model

METHODS = ("onehot", "ls", "lspp")


@dataclass
class TeacherConfig:
    out: str
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    model: str = "small_cnn"
    method: str = "lspp"
    alpha: float = 0.1
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0
    max_steps: int | None = None
    image_size: int | None = None
    mixed_precision: str = "no"
    overwrite: bool = False


def validate_config(config: TeacherConfig) -> None:
    """Cheap checks before any data is read, each a one-line `KDError`."""
    if config.method not in METHODS:
        raise KDError(f"unknown --method {config.method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 <= config.alpha < 1.0:
        raise KDError(f"--alpha must be in [0, 1), got {config.alpha}")
    for flag, value in (("--epochs", config.epochs), ("--batch-size", config.batch_size)):
        if value < 1:
            raise KDError(f"{flag} must be a positive integer, got {value}")
    if config.max_steps is not None and config.max_steps < 1:
        raise KDError(f"--max-steps must be a positive integer, got {config.max_steps}")
    if config.lr <= 0:
        raise KDError(f"--lr must be positive, got {config.lr}")
    if config.weight_decay < 0:
        raise KDError(f"--weight-decay must be >= 0, got {config.weight_decay}")


def build_criterion(method: str, num_classes: int, alpha: float) -> nn.Module:
    if method == "lspp":
        return LSPPLoss(num_classes, alpha)
    # torch's label smoothing is the paper's eq. 2: (1 - a) * onehot + a / K on every class.
    return nn.CrossEntropyLoss(label_smoothing=alpha if method == "ls" else 0.0)


def train_teacher(config: TeacherConfig) -> Path:
    """Train a teacher and write its run directory; returns the directory."""
    validate_config(config)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    out = prepare_run_dir(config.out, config.overwrite) if accelerator.is_main_process else Path(config.out)
    accelerator.wait_for_everyone()
    set_seed(config.seed)

    data = load_dataset(config.dataset, config.data_dir, download=config.download, image_size=config.image_size)
    net = build_model(config.model, data.num_classes, data.channels, data.image_size)
    criterion = build_criterion(config.method, data.num_classes, config.alpha)
    run_config = {
        "stage": "teacher",
        **asdict(config),
        "dataset_name": data.name,
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "in_channels": data.channels,
        "image_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
        "world_size": accelerator.num_processes,
        "toolkit_version": kd.__version__,
    }
    if accelerator.is_main_process:
        write_json_atomic(out / CONFIG_FILE, run_config)
        accelerator.print(f"{data.describe()} | model {config.model} | method {config.method} -> {out}")

    fit_config = FitConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        max_steps=config.max_steps,
    )
    result = fit(TrainModule(net, criterion), data, fit_config, accelerator, desc="teacher")

    if accelerator.is_main_process:
        save_model(out / MODEL_FILE, net)
        if config.method == "lspp":
            save_cmatrix(
                out / CMATRIX_FILE,
                CMatrix.from_logits(
                    criterion.logits.detach().float().cpu(),
                    class_names=data.class_names,
                    alpha=config.alpha,
                    source="lspp",
                    dataset=data.name,
                    teacher_model=config.model,
                    teacher_top1=result.metrics["test_top1"],
                ),
            )
        metrics = {
            **result.metrics,
            "epochs": result.epochs,
            "steps": result.steps,
            "train_seconds": result.train_seconds,
            "images_per_second": result.images_per_second,
            "peak_memory_mb": result.peak_memory_mb,
            "peak_memory_kind": result.peak_memory_kind,
            "epoch_train_loss": result.epoch_train_loss,
            "num_classes": data.num_classes,
            "class_names": list(data.class_names),
            "world_size": accelerator.num_processes,
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
