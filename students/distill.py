"""Student stage: train a student from a proxy C-matrix, a teacher network, or plain labels.

All modes share one run (`kd.training.run.prepare_run`); the method decides the targets and the loss.
What the stage provides is what the method declares it needs:

* `--proxy FILE`: a C-matrix (method `proxy`, PT-LS++: targets (1-a) onehot(y) + a C[y]);
* `--teacher RUN_DIR`, or `--teacher-model NAME --teacher-weights FILE` (a pretrained timm or
  torchvision classifier, fed through an input adapter, see `kd.models.pretrained`): a frozen teacher
  network (method `kd`, Hinton: per-sample soft predictions);
* neither: plain labels, with any method that needs nothing (onehot by default, ls, tfkd, ...).
"""

from __future__ import annotations

from pathlib import Path

from kd.cmatrix.artifact import CMatrix, CMatrixError, check_class_names, load_cmatrix, remap_by_name
from kd.data.datasets import ImageDataset
from kd.errors import KDError
from kd.methods import Setup, get_method, method_names, resolve_params
from kd.models.pretrained import (
    PretrainedTeacher, Teacher, check_pretrained_flags, check_run_teacher_fits, load_pretrained_teacher, load_run_teacher,
)
from kd.training.run import prepare_run
from lspp_kd.students.settings import StudentSettings

# By what the student is given: the default method, the mode recorded in config.json, and the flag.
DEFAULT_METHOD = {None: "onehot", "cmatrix": "proxy", "teacher": "kd"}
MODE = {None: "plain", "cmatrix": "proxy", "teacher": "kd"}
NEED_FLAG = {
    None: "neither --proxy nor --teacher", "cmatrix": "--proxy FILE", "teacher": "--teacher RUN_DIR or --teacher-model NAME",
}


def _need(settings: StudentSettings) -> str | None:
    if settings.teacher and settings.teacher_model:
        raise KDError("--teacher RUN_DIR and --teacher-model NAME are alternatives: pass one of them")
    teacher = settings.teacher or settings.teacher_model
    if settings.proxy and teacher:
        flag = "--teacher" if settings.teacher else "--teacher-model"
        raise KDError(f"--proxy and {flag} are alternatives: pass one of them (or neither for a plain student)")
    check_pretrained_flags(settings.teacher_model, settings.teacher_weights, settings.teacher_image_size, settings.teacher_classes)
    return "cmatrix" if settings.proxy else "teacher" if teacher else None


def _proxy_cmatrix(path: str, data: ImageDataset, remap: bool) -> CMatrix:
    cmatrix = load_cmatrix(path)
    try:
        check_class_names(cmatrix, data.class_names, where=str(path))
    except CMatrixError:
        if not (remap and set(cmatrix.class_names) == set(data.class_names)):
            raise
        cmatrix = remap_by_name(cmatrix, data.class_names)
    return cmatrix


def _teacher(settings: StudentSettings, pretrained: PretrainedTeacher | None, data: ImageDataset) -> Teacher:
    """The KD teacher for `data`: a pretrained classifier behind its input adapter, or a run's network."""
    if pretrained is not None:
        return pretrained.build(data)
    teacher, teacher_config = load_run_teacher(settings.teacher)
    check_run_teacher_fits(settings.teacher, teacher_config, data)
    return teacher


def distill(settings: StudentSettings) -> Path:
    """Train a student and write its run directory."""
    need = _need(settings)
    name = settings.method or DEFAULT_METHOD[need]
    cls = get_method(name)
    if "student" not in cls.stages:
        raise KDError(f"--method {name} trains teachers only; a student takes one of {', '.join(method_names('student'))}")
    if cls.needs != need:
        raise KDError(
            f"--method {name} needs {NEED_FLAG[cls.needs]}, but the student was given {NEED_FLAG[need]}; "
            f"with {NEED_FLAG[need]} use --method {' or '.join(method_names('student', need))}"
        )
    params = resolve_params(cls, settings.method_params)
    extra_config = {"mode": MODE[need]}
    pretrained = None
    # Files are read and validated before any data is.
    if need == "cmatrix":
        load_cmatrix(settings.proxy)
    elif settings.teacher_model:
        pretrained = load_pretrained_teacher(
            settings.teacher_model, settings.teacher_weights, settings.teacher_image_size, settings.teacher_classes
        )
        extra_config.update(pretrained.record())

    with prepare_run("student", settings, cls) as run:
        run.extra_config = extra_config
        setup = Setup(run.data.num_classes, tuple(run.data.class_names), params)
        if need == "cmatrix":
            setup.cmatrix = _proxy_cmatrix(settings.proxy, run.data, params["remap_by_name"])
        elif need == "teacher":
            teacher = _teacher(settings, pretrained, run.data)
            setup.teacher, setup.teacher_model = teacher.net, teacher.model
        return run.train(cls(setup))
