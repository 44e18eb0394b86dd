"""Student stage: train a student from a proxy C-matrix, a teacher network, or plain labels.

All modes share one run (`kd.training.run.prepare_run`); the method decides the targets and the loss.
What the stage provides is what the method declares it needs:

* `--proxy FILE`: a C-matrix (method `proxy`, PT-LS++: targets (1-a) onehot(y) + a C[y]);
* `--teacher RUN_DIR`, or `--teacher-model NAME --teacher-weights FILE` (a pretrained timm or
  torchvision classifier, fed through an input adapter, see `kd.models.pretrained`): a frozen teacher
  network (method `kd`, Hinton: per-sample soft predictions);
* `--soft-labels FILE` (`kd soft-labels`): a teacher's stored per-sample logits (methods kd, dkd,
  dist), looked up by sample instead of running a network (`kd.softlabels.artifact.SoftLabels`);
* none of them: plain labels, with any method that needs nothing (onehot by default, ls, tfkd, ...).
"""

from __future__ import annotations

from pathlib import Path

from kd.cmatrix.artifact import CMatrix, CMatrixError, check_class_names, file_sha256, load_cmatrix, remap_by_name
from kd.data.datasets import ImageDataset, sample_names
from kd.errors import KDError
from kd.methods import Setup, get_method, method_names, resolve_params
from kd.models.pretrained import (
    PretrainedTeacher, Teacher, check_pretrained_flags, check_run_teacher_fits, load_pretrained_teacher, load_run_teacher,
    renormalised_run_teacher,
)
from kd.softlabels.artifact import SoftLabelFile, SoftLabels, SoftLabelsError, load_soft_labels
from kd.training.run import Run, prepare_run
from lspp_kd.students.settings import StudentSettings

# By what the student is given: the default method, the mode recorded in config.json, and the flag.
DEFAULT_METHOD = {None: "onehot", "cmatrix": "proxy", "teacher": "kd"}
MODE = {None: "plain", "cmatrix": "proxy", "teacher": "kd"}
NEED_FLAG = {
    None: "neither --proxy nor --teacher", "cmatrix": "--proxy FILE",
    "teacher": "--teacher RUN_DIR, --teacher-model NAME or --soft-labels FILE",
}


def _need(settings: StudentSettings) -> str | None:
    given = [flag for flag, value in (("--proxy FILE", settings.proxy), ("--teacher RUN_DIR", settings.teacher),
                                      ("--teacher-model NAME", settings.teacher_model), ("--soft-labels FILE", settings.soft_labels))
             if value]
    if len(given) > 1:
        raise KDError(f"{given[0]} and {given[1]} are alternatives: pass one of them (or none for a plain student)")
    teacher = settings.teacher or settings.teacher_model or settings.soft_labels
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
    return renormalised_run_teacher(teacher, teacher_config, data)


def _stored_teacher(path: str, stored: SoftLabelFile, run: Run) -> SoftLabels:
    """The soft labels of `run`'s training samples, from a file made for the same data."""
    if stored.data_fingerprint != run.whole_data_fingerprint:
        raise SoftLabelsError(f"{path}: made for other data ({stored.dataset}, {stored.data_fingerprint}); "
                              f"the student's is {run.data.name}, {run.whole_data_fingerprint}")
    return SoftLabels(stored, sample_names(run.data.train), run.data.class_names, path)


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
    elif settings.soft_labels:
        stored = load_soft_labels(settings.soft_labels)
        extra_config.update(mode="stored", soft_labels_teacher=stored.teacher_model, soft_labels_sha256=file_sha256(settings.soft_labels))
    elif settings.teacher_model:
        pretrained = load_pretrained_teacher(
            settings.teacher_model, settings.teacher_weights, settings.teacher_image_size, settings.teacher_classes
        )
        extra_config.update(pretrained.record())

    with prepare_run("student", settings, cls) as run:
        run.extra_config.update(extra_config)
        setup = Setup(run.data.num_classes, tuple(run.data.class_names), params)
        if need == "cmatrix":
            setup.cmatrix = _proxy_cmatrix(settings.proxy, run.data, params["remap_by_name"])
        elif settings.soft_labels:
            setup.teacher, setup.teacher_model = _stored_teacher(settings.soft_labels, stored, run), stored.teacher_model
        elif need == "teacher":
            teacher = _teacher(settings, pretrained, run.data)
            setup.teacher, setup.teacher_model = teacher.net, teacher.model
        return run.train(cls(setup))
