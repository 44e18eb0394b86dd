"""LS++, the proxy teacher and Hinton KD for any sequence classifier under an unmodified `transformers.Trainer`.

Each class wraps a classifier (an `AutoModelForSequenceClassification`, or your own module
whose output is the logits, a tuple starting with them, or anything with `.logits`) and adds
the loss, so the wrapper is what you give `Trainer(model=...)`:

* `LSPPForSequenceClassification(model, alpha=0.1)`: trains with Label Smoothing++. The
  learnable C logits (an `LSPPLoss`) are a submodule of the wrapper, so the Trainer optimises
  them, DDP all-reduces their gradients like any weight, and every checkpoint holds them
  (resume restores C with its optimizer state). They get no weight decay: the submodule is
  called `lspp_bias`, and the Trainer's `get_decay_parameter_names` leaves out every parameter
  whose name contains "bias".
* `ProxyForSequenceClassification(model, "cmatrix.safetensors")`: a student trained from a
  C-matrix file alone (no teacher network); its class names must be the model's.
* `KDForSequenceClassification(model, teacher)`: Hinton KD from a teacher network, which is
  frozen, kept in eval mode, run without gradients, and is not part of the wrapper's
  parameters or checkpoints.
* `CMatrixExport()`: a `TrainerCallback` that writes cmatrix.safetensors (class names from the
  model's `config.id2label`) into `args.output_dir` at the end of training and into each
  `checkpoint-N` folder when the Trainer saves one (on the main process only).

The losses are the toolkit's own (`kd.losses`); the wrappers only route logits and labels.
Called with `labels` (Trainer's batches) a wrapper returns a `SequenceClassifierOutput` with
the loss; without, the model's logits. `wrapper.save_pretrained(path)` saves the wrapped model
as Hugging Face saves it (and, for LS++, the C-matrix next to it); the Trainer's own
`save_model` and checkpoints store the wrapper's state dict (model and C together).

This module needs the `text` extra (transformers, tokenizers); `kd` never imports it itself.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
    from transformers.modeling_outputs import SequenceClassifierOutput
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as _exc:  # one line, naming the fix
    raise ImportError(
        "kd.integrations.transformers needs the 'text' extra (transformers, tokenizers): pip install 'lspp-kd[text]'"
    ) from _exc

import torch
from torch import nn

from kd.cmatrix.artifact import CMatrix, CMatrixError
from kd.errors import KDError
from kd.losses.functional import DEFAULT_ALPHA, KD_CE_WEIGHT, KD_TEMPERATURE, KD_WEIGHT, hinton_loss
from kd.losses.modules import LSPPLoss, ProxyTeacherLoss
from kd.training.rundir import CMATRIX_FILE

__all__ = [
    "CMatrixExport",
    "KDForSequenceClassification",
    "LSPPForSequenceClassification",
    "ProxyForSequenceClassification",
    "model_class_names",
]

logger = logging.getLogger(__name__)

_NO_SIGNATURE = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def model_class_names(model: nn.Module, class_names: Sequence[str] | None = None, owner: str = "kd") -> tuple[str, ...]:
    """The model's class names in label order: `class_names` if given, else its `config.id2label`.

    A one-line `KDError` if there are none, if they do not fit `config.num_labels`, or if
    `id2label` does not map 0..K-1.
    """
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if class_names is not None:
        names = tuple(str(name) for name in class_names)
        if isinstance(num_labels, int) and num_labels != len(names):
            raise KDError(f"{owner}: {len(names)} class names for a model with {num_labels} labels (config.num_labels)")
        return names
    id2label = getattr(config, "id2label", None)
    if not isinstance(id2label, Mapping) or not id2label:
        raise KDError(f"{owner}: the model has no config.id2label; pass class_names=[...] in label order")
    try:
        return tuple(str(id2label[i] if i in id2label else id2label[str(i)]) for i in range(len(id2label)))
    except KeyError:
        keys = ", ".join(sorted(str(key) for key in id2label)[:5])
        raise KDError(f"{owner}: config.id2label must map 0..{len(id2label) - 1} to class names, got keys {keys}") from None


def _logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, `.logits` / ["logits"], or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise KDError(f"the model returned {type(output).__name__} without logits; return a tensor or an output with .logits")
    return logits


def _model_name(model: nn.Module) -> str:
    """A name for the C-matrix's provenance: the config's name_or_path, else its model_type, else the class."""
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__)


def _forward_signature(model: nn.Module) -> inspect.Signature:
    """The wrapped model's named inputs plus `labels`, all keyword-only.

    The Trainer keeps only the batch columns that `inspect.signature(model.forward)` names (its
    `remove_unused_columns`), so the wrapper shows it the inner model's inputs.
    """
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    names = [p.name for p in parameters if p.kind not in _NO_SIGNATURE and p.name != "labels"]
    return inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in [*names, "labels"]]
    )


class _LossWrapper(nn.Module):
    """A classifier and a loss in one module: `forward(..., labels=None)` returns the model's logits and, with labels, the loss."""

    # The losses are batch means: the Trainer must neither pass `num_items_in_batch` nor skip
    # its division by the gradient accumulation steps.
    accepts_loss_kwargs = False
    _keys_to_ignore_on_save = None

    def __init__(self, model: nn.Module, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise KDError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.class_names = model_class_names(model, class_names, owner)
        # Per instance, so that the Trainer sees the wrapped model's inputs (a partial, unlike a
        # closure, is copied and pickled with the module).
        forward = functools.partial(type(self).forward, self)
        forward.__signature__ = _forward_signature(model)  # type: ignore[attr-defined]
        self.forward = forward

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    @property
    def config(self) -> Any:
        """The wrapped model's config (absent if it has none)."""
        return self.model.config

    @property
    def main_input_name(self) -> str:
        return getattr(self.model, "main_input_name", "input_ids")

    def forward(self, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        """The wrapped model's forward pass (its inputs unchanged), with the loss when `labels` are given.

        `labels` are class indices (N,) or label distributions (N, K).
        """
        output = self.model(*args, **kwargs)
        logits = _logits_of(output)
        loss = None if labels is None else self.compute_loss(logits, labels, args, kwargs)
        return SequenceClassifierOutput(
            loss=loss, logits=logits,
            hidden_states=getattr(output, "hidden_states", None), attentions=getattr(output, "attentions", None),
        )

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's (the Trainer calls it with `gradient_checkpointing=True`)."""
        return self.model.activation_checkpointing_enable(*args, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> None:
        """Save the wrapped model as it saves itself (`model.save_pretrained`), without the wrapper."""
        if not hasattr(self.model, "save_pretrained"):
            raise KDError(f"{type(self).__name__}: {type(self.model).__name__} has no save_pretrained; save .model yourself")
        self.model.save_pretrained(path, **kwargs)


class LSPPForSequenceClassification(_LossWrapper):
    """A classifier trained with Label Smoothing++: the model and the learnable C logits in one module.

    Args:
        model: the classifier; its class names come from `model.config.id2label`.
        alpha: the mixing mass a of `LSPPLoss` (0.1, the paper's).
        c_loss: how C is trained, as in `LSPPLoss` ("detached", the paper's).
        class_names: the class names in label order, for a model without `config.id2label`.

    The C logits are `self.lspp_bias.c_logits` (an `LSPPLoss`, also `self.criterion`); the
    name holds "bias" so that the Trainer does not weight-decay them (`no_weight_decay()` names
    them for timm-style parameter groups).
    """

    def __init__(
        self, model: nn.Module, alpha: float = DEFAULT_ALPHA, c_loss: str = "detached",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(model, class_names)
        self.lspp_bias = LSPPLoss(self.num_labels, alpha=alpha, c_loss=c_loss, class_names=self.class_names)

    @property
    def criterion(self) -> LSPPLoss:
        return self.lspp_bias

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.lspp_bias(logits, labels)

    def no_weight_decay(self) -> set[str]:
        return {f"lspp_bias.{name}" for name in self.lspp_bias.no_weight_decay()}

    def to_cmatrix(self, dataset: str = "", model: str = "", top1: float | None = None) -> CMatrix:
        """The current C-matrix as a `CMatrix` (teacher model: the config's name unless given)."""
        return self.lspp_bias.to_cmatrix(dataset, model or _model_name(self.model), top1)

    def export_cmatrix(self, path: str | os.PathLike, dataset: str = "", model: str = "", top1: float | None = None) -> Path:
        """Write the current C-matrix to `path` (a directory gets cmatrix.safetensors); returns the file."""
        return self.lspp_bias.export(path, dataset, model or _model_name(self.model), top1)

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> None:
        """The wrapped model's `save_pretrained(path)`, and the C-matrix as path/cmatrix.safetensors."""
        super().save_pretrained(path, **kwargs)
        self.export_cmatrix(Path(path) / CMATRIX_FILE)


class ProxyForSequenceClassification(_LossWrapper):
    """A student trained from a C-matrix alone (the proxy teacher, PT-LS++): targets (1 - a) onehot(y) + a C[y].

    Args:
        model: the student; its class names (`config.id2label`) must be the C-matrix's.
        cmatrix: a cmatrix.safetensors path or a `CMatrix`.
        alpha: the mixing mass; default the file's.
        class_names: the class names in label order, for a model without `config.id2label`.
        remap_by_name: re-order the C-matrix to the model's label order when the names are the
            same set in another order.
    """

    def __init__(
        self, model: nn.Module, cmatrix: CMatrix | str | os.PathLike, alpha: float | None = None,
        class_names: Sequence[str] | None = None, remap_by_name: bool = False,
    ) -> None:
        super().__init__(model, class_names)
        try:
            self.proxy = ProxyTeacherLoss(cmatrix, alpha=alpha, class_names=self.class_names, remap_by_name=remap_by_name)
        except CMatrixError as exc:  # the "dataset" of the message is the model; its option is not the CLI flag
            message = str(exc).replace("with --remap-by-name", "with remap_by_name=True")
            raise CMatrixError(f"{message} (the dataset's classes here: the model's config.id2label)") from None

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.proxy(logits, labels)


class KDForSequenceClassification(_LossWrapper):
    """A student trained by Hinton KD from a teacher network (`kd.losses.hinton_loss`).

    The teacher sees the student's inputs (so they must share a tokenizer), is frozen and kept
    in eval mode, runs without gradients, and is held outside the module tree: it is not
    optimised, not wrapped by DDP, not in checkpoints, and is moved to the student's device on
    first use.

    Args:
        model: the student.
        teacher: the teacher network (a trained model, or an `LSPPForSequenceClassification`);
            with a `config.id2label` its class names must be the student's.
        temperature, kd_weight, ce_weight, logit_std: as in `hinton_loss` (T = 4, 0.9, 0.1).
        class_names: the class names in label order, for a student without `config.id2label`.
    """

    def __init__(
        self, model: nn.Module, teacher: nn.Module, temperature: float = KD_TEMPERATURE,
        kd_weight: float = KD_WEIGHT, ce_weight: float = KD_CE_WEIGHT, logit_std: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(model, class_names)
        owner = type(self).__name__
        if not isinstance(teacher, nn.Module):
            raise KDError(f"{owner}: teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if isinstance(getattr(getattr(teacher, "config", None), "id2label", None), Mapping):
            teacher_names = model_class_names(teacher, None, f"{owner}: teacher")
            if teacher_names != self.class_names:
                raise KDError(
                    f"{owner}: the teacher's classes ({', '.join(teacher_names[:5])}) are not the student's "
                    f"({', '.join(self.class_names[:5])}); give both models the same config.id2label"
                )
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise KDError(f"{owner}: temperature must be a positive number, got {temperature!r}")
        teacher.eval().requires_grad_(False)
        self.__dict__["teacher"] = teacher  # not a submodule (see the class docstring)
        self.temperature, self.kd_weight, self.ce_weight, self.logit_std = float(temperature), kd_weight, ce_weight, logit_std

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        teacher = self.teacher
        weight = next(teacher.parameters(), None)
        if weight is not None and weight.device != logits.device:
            teacher.to(logits.device)
        if teacher.training:
            teacher.eval()
        with torch.no_grad():
            teacher_logits = _logits_of(teacher(*args, **kwargs))
        if teacher_logits.shape != logits.shape:
            raise KDError(
                f"{type(self).__name__}: teacher logits have shape {tuple(teacher_logits.shape)}, "
                f"the student's {tuple(logits.shape)}"
            )
        return hinton_loss(
            logits, labels, teacher_logits, self.temperature, self.kd_weight, self.ce_weight, self.logit_std
        )["loss"]


def _lspp_model(model: Any) -> LSPPForSequenceClassification:
    """The `LSPPForSequenceClassification` the Trainer trains (unwrapping DDP's `.module`), or a one-line `KDError`."""
    while not isinstance(model, LSPPForSequenceClassification) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not isinstance(model, LSPPForSequenceClassification):
        raise KDError(
            f"CMatrixExport: the Trainer's model is a {type(model).__name__}, which learns no C-matrix; "
            "give the Trainer LSPPForSequenceClassification(model)"
        )
    return model


class CMatrixExport(TrainerCallback):
    """Writes the learned C-matrix (cmatrix.safetensors) at the end of training and with every checkpoint.

    Into `args.output_dir` when training ends, and into each `checkpoint-N` folder the Trainer
    saves, on the main process only. The class names are the model's (`config.id2label`), the
    teacher model its config's name; `dataset` is recorded as given, and the teacher's accuracy
    is the last `top1_metric` value (a fraction) in the Trainer's log, if there is one.
    """

    def __init__(self, dataset: str = "", model_name: str = "", top1_metric: str = "eval_accuracy") -> None:
        self.dataset, self.model_name, self.top1_metric = dataset, model_name, top1_metric

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201 - TrainerCallback's
        _lspp_model(model)  # fail now, not at the first checkpoint

    def on_save(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                self._export(model, folder, state)
            else:
                logger.warning("CMatrixExport: no checkpoint folder %s; the C-matrix is not written there", folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            self._export(model, Path(args.output_dir), state)

    def _export(self, model: Any, folder: Path, state: Any) -> Path:
        return _lspp_model(model).export_cmatrix(folder / CMATRIX_FILE, self.dataset, self.model_name, self._top1(state))

    def _top1(self, state: Any) -> float | None:
        for entry in reversed(state.log_history):
            value = entry.get(self.top1_metric)
            if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
                return float(value)
        return None
