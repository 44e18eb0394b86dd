"""Teacher stage: train a classifier with any teacher method and export its C-matrix (LS++, OLS)."""

from __future__ import annotations

from pathlib import Path

from kd.errors import KDError
from kd.methods import Setup, get_method, method_names, resolve_params
from kd.training.run import prepare_run
from kd.training.settings import Settings

DEFAULT_METHOD = "lspp"


def train_teacher(settings: Settings) -> Path:
    """Train a teacher and write its run directory (plus cmatrix.safetensors for LS++ and OLS)."""
    name = settings.method or DEFAULT_METHOD
    cls = get_method(name)
    if "teacher" not in cls.stages:
        raise KDError(f"--method {name} is a student method; a teacher takes one of {', '.join(method_names('teacher'))}")
    params = resolve_params(cls, settings.method_params)
    with prepare_run("teacher", settings, cls) as run:
        return run.train(cls(Setup(run.data.num_classes, tuple(run.data.class_names), params)))
