"""Student stage: train a student from a proxy C-matrix, a teacher network, or plain labels.

All modes share one loop (`kd.run.run_stage`); the method decides the targets and the loss.
What the stage provides is what the method declares it needs:

* `--proxy FILE`: a C-matrix (method `proxy`, PT-LS++: targets (1-a) onehot(y) + a C[y]);
* `--teacher RUN_DIR`: a frozen teacher network (method `kd`, Hinton: per-sample soft predictions);
* neither: plain labels, with any method that needs nothing (onehot by default, ls, tfkd, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kd.cmatrix import CMatrix, CMatrixError, check_class_names, load_cmatrix, remap_by_name
from kd.datasets import ImageDataset
from kd.errors import KDError
from kd.methods import Method, Setup, get_method, method_names, resolve_params
from kd.rundir import load_run_model
from kd.run import RunConfig, run_stage

# By what the student is given: the default method, the mode recorded in config.json, and the flag.
DEFAULT_METHOD = {None: "onehot", "cmatrix": "proxy", "teacher": "kd"}
MODE = {None: "plain", "cmatrix": "proxy", "teacher": "kd"}
NEED_FLAG = {None: "neither --proxy nor --teacher", "cmatrix": "--proxy FILE", "teacher": "--teacher RUN_DIR"}


@dataclass
class StudentConfig(RunConfig):
    proxy: str | None = None
    teacher: str | None = None


def _need(config: StudentConfig) -> str | None:
    if config.proxy and config.teacher:
        raise KDError("--proxy and --teacher are alternatives: pass one of them (or neither for a plain student)")
    return "cmatrix" if config.proxy else "teacher" if config.teacher else None


def _proxy_cmatrix(path: str, data: ImageDataset, remap: bool) -> CMatrix:
    cmatrix = load_cmatrix(path)
    try:
        check_class_names(cmatrix, data.class_names, where=str(path))
    except CMatrixError:
        if not (remap and set(cmatrix.class_names) == set(data.class_names)):
            raise
        cmatrix = remap_by_name(cmatrix, data.class_names)
    return cmatrix


def _teacher(run_dir: str, data: ImageDataset) -> tuple[nn.Module, str]:
    teacher, teacher_config = load_run_model(run_dir)
    if list(teacher_config["class_names"]) != list(data.class_names):
        raise KDError(
            f"teacher {run_dir} was trained on classes {teacher_config['class_names'][:5]}..., "
            f"the dataset has {list(data.class_names)[:5]}...: train the student on the teacher's dataset"
        )
    if (teacher_config["in_channels"], teacher_config["image_size"]) != (data.channels, data.image_size):
        raise KDError(
            f"teacher {run_dir} sees {teacher_config['in_channels']}x{teacher_config['image_size']}px images, "
            f"the dataset gives {data.channels}x{data.image_size}px: pass --image-size {teacher_config['image_size']}"
        )
    return teacher, teacher_config["model"]


def distill(config: StudentConfig) -> Path:
    """Train a student and write its run directory."""
    need = _need(config)
    name = config.method or DEFAULT_METHOD[need]
    cls = get_method(name)
    if "student" not in cls.stages:
        raise KDError(f"--method {name} trains teachers only; a student takes one of {', '.join(method_names('student'))}")
    if cls.needs != need:
        raise KDError(
            f"--method {name} needs {NEED_FLAG[cls.needs]}, but the student was given {NEED_FLAG[need]}; "
            f"with {NEED_FLAG[need]} use --method {' or '.join(method_names('student', need))}"
        )
    params = resolve_params(cls, config.method_params)
    if need == "cmatrix":
        load_cmatrix(config.proxy)  # validate the file before any data is read

    def make_method(data: ImageDataset) -> Method:
        setup = Setup(data.num_classes, tuple(data.class_names), params)
        if need == "cmatrix":
            setup.cmatrix = _proxy_cmatrix(config.proxy, data, params["remap_by_name"])
        elif need == "teacher":
            setup.teacher, setup.teacher_model = _teacher(config.teacher, data)
        return cls(setup)

    return run_stage("student", config, {"mode": MODE[need]}, cls, make_method)
