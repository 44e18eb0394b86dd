"""Student stage: train a student from a proxy C-matrix, a teacher network, or plain labels.

All three modes share one loop (`kd.run.run_stage`); only the target source and the loss
differ:

* proxy  (PT-LS++): targets (1-a) * onehot(y) + a * C[y] from a C-matrix file alone;
* kd     (Hinton):  a frozen teacher's per-sample soft predictions on the same batch;
* plain:            1-hot (or label smoothing with `--method ls`), the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kd.cmatrix import CMatrixError, check_class_names, load_cmatrix, remap_by_name
from kd.datasets import ImageDataset
from kd.errors import KDError
from kd.kd_losses import HintonKDLoss, ProxyTeacherLoss
from kd.rundir import load_run_model
from kd.run import Objective, RunConfig, check_alpha, run_stage

PLAIN_METHODS = ("onehot", "ls")


@dataclass
class StudentConfig(RunConfig):
    proxy: str | None = None
    teacher: str | None = None
    method: str = "onehot"  # plain mode only
    alpha: float | None = None  # proxy: defaults to the file's alpha; plain ls: 0.1
    remap_by_name: bool = False
    temperature: float = 4.0
    kd_weight: float = 0.9
    ce_weight: float = 0.1


def _mode(config: StudentConfig) -> str:
    if config.proxy and config.teacher:
        raise KDError("--proxy and --teacher are alternatives: pass one of them (or neither for a plain student)")
    return "proxy" if config.proxy else "kd" if config.teacher else "plain"


def _check(config: StudentConfig, mode: str) -> None:
    if config.alpha is not None:
        check_alpha(config.alpha)
    if mode == "plain" and config.method not in PLAIN_METHODS:
        raise KDError(f"unknown --method {config.method!r} for a plain student; choose one of {', '.join(PLAIN_METHODS)}")
    if mode == "kd":
        if config.temperature <= 0:
            raise KDError(f"--temperature must be positive, got {config.temperature}")
        if config.kd_weight < 0 or config.ce_weight < 0 or config.kd_weight + config.ce_weight == 0:
            raise KDError("--kd-weight and --ce-weight must be >= 0 and not both 0")
    if mode == "proxy":
        # Validate the file before any data is read: a bad file fails in a second, not after decoding.
        load_cmatrix(config.proxy)


def _proxy_objective(config: StudentConfig, data: ImageDataset) -> Objective:
    cmatrix = load_cmatrix(config.proxy)
    try:
        check_class_names(cmatrix, data.class_names, where=str(config.proxy))
    except CMatrixError:
        if not (config.remap_by_name and set(cmatrix.class_names) == set(data.class_names)):
            raise
        cmatrix = remap_by_name(cmatrix, data.class_names)
    alpha = cmatrix.alpha if config.alpha is None else config.alpha
    return Objective(
        criterion=ProxyTeacherLoss(cmatrix.probs, alpha),
        card={"method": "proxy", "target_source": f"C-matrix ({cmatrix.source}, {cmatrix.teacher_model or '?'})", "alpha": alpha},
    )


def _teacher_objective(config: StudentConfig, data: ImageDataset) -> Objective:
    teacher, teacher_config = load_run_model(config.teacher)
    if list(teacher_config["class_names"]) != list(data.class_names):
        raise KDError(
            f"teacher {config.teacher} was trained on classes {teacher_config['class_names'][:5]}..., "
            f"the dataset has {list(data.class_names)[:5]}...: train the student on the teacher's dataset"
        )
    if (teacher_config["in_channels"], teacher_config["image_size"]) != (data.channels, data.image_size):
        raise KDError(
            f"teacher {config.teacher} sees {teacher_config['in_channels']}x{teacher_config['image_size']}px images, "
            f"the dataset gives {data.channels}x{data.image_size}px: pass --image-size {teacher_config['image_size']}"
        )
    return Objective(
        criterion=HintonKDLoss(config.temperature, config.kd_weight, config.ce_weight),
        teacher=teacher,
        card={"method": "kd", "target_source": f"teacher {teacher_config['model']} (per sample)"},
    )


def _plain_objective(config: StudentConfig) -> Objective:
    alpha = (0.1 if config.alpha is None else config.alpha) if config.method == "ls" else 0.0
    return Objective(
        criterion=nn.CrossEntropyLoss(label_smoothing=alpha),
        card={"method": config.method, "target_source": "labels", "alpha": alpha},
    )


def distill(config: StudentConfig) -> Path:
    """Train a student and write its run directory."""
    mode = _mode(config)
    _check(config, mode)

    def make_objective(data: ImageDataset) -> Objective:
        if mode == "proxy":
            return _proxy_objective(config, data)
        if mode == "kd":
            return _teacher_objective(config, data)
        return _plain_objective(config)

    extra = {"mode": mode}
    return run_stage("student", config, extra, make_objective)
