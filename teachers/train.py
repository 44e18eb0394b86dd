"""Teacher stage: train a classifier with 1-hot, LS or LS++ targets and export its C-matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kd.cmatrix import CMatrix, save_cmatrix
from kd.datasets import ImageDataset
from kd.engine import FitResult
from kd.errors import KDError
from kd.lspp import LSPPLoss
from kd.rundir import CMATRIX_FILE
from kd.run import Objective, RunConfig, check_alpha, run_stage

METHODS = ("onehot", "ls", "lspp")


@dataclass
class TeacherConfig(RunConfig):
    method: str = "lspp"
    alpha: float = 0.1


def build_criterion(method: str, num_classes: int, alpha: float) -> nn.Module:
    if method == "lspp":
        return LSPPLoss(num_classes, alpha)
    # torch's label smoothing is the paper's eq. 2: (1 - a) * onehot + a / K on every class.
    return nn.CrossEntropyLoss(label_smoothing=alpha if method == "ls" else 0.0)


def train_teacher(config: TeacherConfig) -> Path:
    """Train a teacher and write its run directory (plus cmatrix.safetensors for LS++)."""
    if config.method not in METHODS:
        raise KDError(f"unknown --method {config.method!r}; choose one of {', '.join(METHODS)}")
    check_alpha(config.alpha)

    def make_objective(data: ImageDataset) -> Objective:
        return Objective(
            criterion=build_criterion(config.method, data.num_classes, config.alpha),
            card={"method": config.method, "target_source": "labels" if config.method != "lspp" else "labels+learned C"},
        )

    def write_cmatrix(out: Path, data: ImageDataset, objective: Objective, result: FitResult) -> None:
        if config.method != "lspp":
            return
        save_cmatrix(
            out / CMATRIX_FILE,
            CMatrix.from_logits(
                objective.criterion.logits.detach().float().cpu(),
                class_names=data.class_names,
                alpha=config.alpha,
                source="lspp",
                dataset=data.name,
                teacher_model=config.model,
                teacher_top1=result.metrics["test_top1"],
            ),
        )

    return run_stage("teacher", config, {}, make_objective, write_cmatrix)
