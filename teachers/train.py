"""Teacher stage: train a classifier with any teacher method and export its C-matrix (LS++, OLS)."""

from __future__ import annotations

from pathlib import Path

from kd.datasets import ImageDataset
from kd.errors import KDError
from kd.methods import Method, Setup, get_method, method_names, resolve_params
from kd.run import RunConfig, run_stage

DEFAULT_METHOD = "lspp"


def train_teacher(config: RunConfig) -> Path:
    """Train a teacher and write its run directory (plus cmatrix.safetensors for LS++ and OLS)."""
    name = config.method or DEFAULT_METHOD
    cls = get_method(name)
    if "teacher" not in cls.stages:
        raise KDError(f"--method {name} is a student method; a teacher takes one of {', '.join(method_names('teacher'))}")
    params = resolve_params(cls, config.method_params)

    def make_method(data: ImageDataset) -> Method:
        return cls(Setup(data.num_classes, tuple(data.class_names), params))

    return run_stage("teacher", config, {}, cls, make_method)
