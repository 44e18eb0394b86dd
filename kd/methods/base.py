"""The method contract: what a training method (onehot, LS, LS++, OLS, KD, ...) declares and does.

A method is an `nn.Module` subclass of `Method` in one file, listed once in the registry
(`kd.methods.REGISTRY`). Its class attributes declare everything the rest of the toolkit
needs to know about it: the stages it serves, its parameters (`Param`: the single source of
the command-line flags, config.json keys, the keys `--resume` compares and docs/methods.md's
method table) and what it needs (a teacher network or a C-matrix file).

The engine calls `forward(logits, targets, context)` on every batch and logs every named part
of the returned dict; the hooks run at epoch ends (`on_epoch_end`), when the run finishes
(`train_metrics`, `export`) and at checkpoints (`rank_state`, for state that differs per
process until it is all-reduced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from kd.errors import KDError

STAGES = ("teacher", "student")


@dataclass(frozen=True)
class Param:
    """One method parameter: the flag `--name-with-dashes`, a config.json key and a resume key."""

    name: str
    default: Any
    help: str
    type: type = float  # float, int, str or bool (a bool is an on/off flag)
    choices: tuple[str, ...] | None = None
    valid: Callable[[Any], bool] | None = None
    rule: str = ""  # what `valid` demands, for the error message ("in [0, 1)")
    metavar: str | None = None  # the flag's placeholder in --help (FILE), else click's for the type
    default_text: str | None = None  # what --help and the method table say of the default, when not the value itself

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        if self.choices is not None and value is not None and value not in self.choices:
            raise KDError(f"{self.flag} must be one of {', '.join(self.choices)}, got {value!r}")
        if self.valid is not None and value is not None and not self.valid(value):
            raise KDError(f"{self.flag} must be {self.rule}, got {value}")


def weights_not_all_zero(params: dict[str, Any], *names: str) -> None:
    """A one-line `KDError` when every one of the named loss weights is 0 (nothing to train)."""
    if all(params[name] == 0 for name in names):
        flags = [f"--{name.replace('_', '-')}" for name in names]
        raise KDError(f"{', '.join(flags[:-1])} and {flags[-1]} must not {'both' if len(flags) == 2 else 'all'} be 0")


def fraction(name: str, default: float | None, help: str) -> Param:
    """A parameter in [0, 1) (smoothing masses)."""
    return Param(name, default, help, valid=lambda v: 0.0 <= v < 1.0, rule="in [0, 1)")


def non_negative(name: str, default: float, help: str) -> Param:
    return Param(name, default, help, valid=lambda v: math.isfinite(v) and v >= 0.0, rule=">= 0")


def positive(name: str, default: float, help: str) -> Param:
    return Param(name, default, help, valid=lambda v: math.isfinite(v) and v > 0.0, rule="positive")


@dataclass
class Setup:
    """What a method is built from: the task, its resolved parameters, and what it declared it needs."""

    num_classes: int
    class_names: tuple[str, ...]
    params: dict[str, Any]
    cmatrix: Any = None  # kd.cmatrix.CMatrix, for needs == "cmatrix"
    teacher: nn.Module | None = None  # for needs == "teacher"
    teacher_model: str = ""  # the teacher network's name, for run cards


@dataclass
class StepContext:
    """Where training is, passed with every batch."""

    epoch: int  # 0-based
    step: int  # optimizer steps done before this batch
    total_steps: int
    steps_per_epoch: int
    images: torch.Tensor | None = None  # the batch the network saw (a KD teacher runs on it)
    indices: torch.Tensor | None = None  # the batch's sample indices into the training split (stored soft labels)


@dataclass
class EpochContext:
    """What an epoch-end hook gets: where training is, and a sum over all processes."""

    epoch: int  # the epoch that just ended, 0-based
    step: int
    total_steps: int
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor.clone()


@dataclass
class ExportInfo:
    """Facts about the finished run that exported artifacts record."""

    class_names: tuple[str, ...]
    dataset: str
    model: str
    test_top1: float | None
    extra: dict[str, Any] = field(default_factory=dict)


class Method(nn.Module):
    """Base class of every method; subclasses set the class attributes and `forward`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: the method table (docs/methods.md) and --help
    stages: ClassVar[tuple[str, ...]] = STAGES
    params: ClassVar[tuple[Param, ...]] = ()
    needs: ClassVar[str | None] = None  # None, "teacher" (a network) or "cmatrix" (a C-matrix file)
    soft_targets: ClassVar[bool] = True  # takes label distributions (Mixup/CutMix) as well as indices
    exports_cmatrix: ClassVar[bool] = False

    def __init__(self, setup: Setup) -> None:
        super().__init__()
        self.num_classes = setup.num_classes
        self.hparams = dict(setup.params)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Checks across parameters (each one alone is checked by its `Param`); a `KDError` if wrong."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        """`{"loss": total, part: value, ...}`; the engine backpropagates "loss" and logs every entry."""
        raise NotImplementedError

    def target_source(self) -> str:
        """Where the targets come from, for run cards and `kd compare`."""
        return "labels"

    def card(self) -> dict[str, Any]:
        """config.json / metrics.json facts: the method, its resolved parameters, the target source."""
        return {"method": self.name, "target_source": self.target_source(), **self.hparams}

    def on_epoch_end(self, context: EpochContext) -> None:
        """Called on every process at the end of each epoch (a collective point)."""

    def rank_state(self) -> dict[str, torch.Tensor]:
        """State that differs between processes until the next epoch end (saved per process)."""
        return {}

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)

    def train_metrics(self, train_seconds: float) -> dict[str, Any]:
        """Extra metrics.json entries once training ends (`train_seconds`: this process's training time)."""
        return {}

    def export(self, run_dir: Path, info: ExportInfo) -> None:
        """Write the method's artifacts (cmatrix.safetensors) into the finished run directory."""

    def no_weight_decay(self) -> set[str]:
        return set()


# Helpers shared by the methods' forward passes. Every loss is computed in float32, also
# under mixed precision.


def hard_labels(targets: torch.Tensor, method: str) -> torch.Tensor:
    """Class indices; label distributions are refused (the method defines no soft-label form)."""
    if targets.dim() != 1:
        raise KDError(f"--method {method} takes class labels only, not label distributions (Mixup/CutMix)")
    return targets.long()


def float32(logits: torch.Tensor) -> torch.autocast:
    """`with float32(logits):` turns autocast off for the loss computation on the logits' device."""
    return torch.autocast(device_type=logits.device.type, enabled=False)
