"""LS++ and its proxy teacher as ordinary PyTorch losses, for any classifier and training loop.

Both are `nn.Module`s called as `loss(logits, targets)` and returning a scalar tensor (timm's
convention); `targets` are class indices (N,) or label distributions (N, K) (Mixup/CutMix).

* `LSPPLoss` trains a network with Label Smoothing++ and owns the learnable C logits, a
  parameter: give `loss.parameters()` to the optimizer (without weight decay), move the loss
  to the network's device, and `loss.export(path)` the learned C-matrix at the end.
* `ProxyTeacherLoss` trains a student from a C-matrix (a `CMatrix` or a cmatrix.safetensors
  path) alone: targets (1 - a) onehot(y) + a C[y], no teacher network.

They are thin adapters over the toolkit's own methods (`build_method("lspp", ...)` and
`build_method("proxy", ...)`), so they compute exactly what `kd train-teacher --method lspp`
and `kd distill --proxy FILE` compute.

Under DistributedDataParallel the C logits must sit inside the module DDP wraps (put the
network and the `LSPPLoss` in one `nn.Module`), or their gradients are not all-reduced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kd.cmatrix import CMatrix, check_class_names, load_cmatrix, save_cmatrix, validate
from kd.cmatrix import remap_by_name as remap_cmatrix_by_name
from kd.errors import KDError
from kd.lspp import DEFAULT_ALPHA, log_targets_from_logits, mix_targets
from kd.methods import ExportInfo, Method, StepContext, build_method
from kd.methods.lspp import LSPP
from kd.methods.proxy import Proxy
from kd.rundir import CMATRIX_FILE

__all__ = ["LSPPLoss", "ProxyTeacherLoss"]

# Neither method reads where training is; they are called with this fixed context.
_NO_SCHEDULE = StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1)


def _check_batch(owner: str, logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> None:
    """One-line `KDError`s for logits and targets whose shapes do not fit a K-class loss."""
    if logits.dim() != 2:
        raise KDError(f"{owner}: logits must be (N, K), got shape {tuple(logits.shape)}")
    if logits.shape[1] != num_classes:
        raise KDError(f"{owner}: logits have {logits.shape[1]} classes but the loss has {num_classes}")
    batch = logits.shape[0]
    if targets.dim() == 1:
        if targets.shape[0] != batch:
            raise KDError(f"{owner}: {targets.shape[0]} targets for {batch} rows of logits")
        if targets.is_floating_point():
            raise KDError(f"{owner}: 1-D targets must be class indices (an integer tensor), got {targets.dtype}")
    elif targets.dim() != 2 or tuple(targets.shape) != (batch, num_classes):
        raise KDError(
            f"{owner}: targets must be class indices (N,) or label distributions (N, K) = ({batch}, {num_classes}), "
            f"got shape {tuple(targets.shape)}"
        )


def _argument_words(error: KDError, method: type[Method]) -> str:
    """A method's parameter error in the words of this API: `alpha`, not the flag `--alpha`."""
    message = str(error)
    for param in method.params:
        message = message.replace(param.flag, param.name)
    return message


def _class_names(owner: str, num_classes: int, class_names: Sequence[str] | None) -> tuple[str, ...] | None:
    if class_names is None:
        return None
    names = tuple(str(name) for name in class_names)
    if len(names) != num_classes:
        raise KDError(f"{owner}: {len(names)} class names for {num_classes} classes")
    if len(set(names)) != len(names) or not all(names):
        raise KDError(f"{owner}: class names must be non-empty and unique")
    return names


class LSPPLoss(nn.Module):
    """Label Smoothing++ (the paper's section 3.2) as a loss: `loss(logits, targets)` -> scalar.

    The target for label y is t = (1 - alpha) onehot(y) + alpha C[y], with C a learned K x K
    row-stochastic matrix with a zero diagonal, stored as K x (K-1) logits (`c_logits`, zeros at
    the start: uniform rows). With `c_loss="detached"` (the paper's) the network is trained by
    H(t, p) with t held fixed and C by H(p, t) with p held fixed; "ce" and "sce" are the
    paper's Table 5 ablation.

    Args:
        num_classes: K, at least 2.
        alpha: the mixing mass a in (0, 1) given to the learned row C[y].
        c_loss: "detached", "ce" or "sce".
        class_names: the K class names recorded in the exported C-matrix (default "0".."K-1").

    Add `loss.parameters()` to the optimizer without weight decay (decay pulls C towards plain
    label smoothing); `no_weight_decay()` names them for timm-style parameter groups.
    """

    def __init__(
        self,
        num_classes: int,
        alpha: float = DEFAULT_ALPHA,
        c_loss: str = "detached",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise KDError(f"LSPPLoss: num_classes must be an integer >= 2, got {num_classes!r}")
        names = _class_names("LSPPLoss", num_classes, class_names)
        try:
            method = build_method("lspp", num_classes, names, alpha=alpha, c_loss=c_loss)
        except KDError as exc:
            raise KDError(f"LSPPLoss: {_argument_words(exc, LSPP)}") from None
        assert isinstance(method, LSPP)
        self.method = method
        self.class_names: tuple[str, ...] = names if names is not None else tuple(str(i) for i in range(num_classes))

    @property
    def num_classes(self) -> int:
        return self.method.num_classes

    @property
    def alpha(self) -> float:
        return float(self.method.hparams["alpha"])

    @property
    def c_loss(self) -> str:
        return str(self.method.hparams["c_loss"])

    @property
    def c_logits(self) -> nn.Parameter:
        """The learnable K x (K-1) C logits (row y lists class y's logits for every column but y)."""
        return self.method.logits

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The LS++ loss (batch mean) for network logits (N, K) and class indices (N,) or distributions (N, K)."""
        _check_batch("LSPPLoss", logits, targets, self.num_classes)
        return self.method(logits, targets, _NO_SCHEDULE)["loss"]

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The current soft targets t (N, K) for class indices (N,) or label distributions (N, K)."""
        return log_targets_from_logits(targets, self.c_logits, self.alpha).exp()

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that must not be weight-decayed: the C logits."""
        return {f"method.{name}" for name in self.method.no_weight_decay()}

    def to_cmatrix(self, dataset: str = "", model: str = "", top1: float | None = None) -> CMatrix:
        """The current C-matrix as a shareable `CMatrix` (source "lspp"), with optional provenance.

        `top1` is the network's test accuracy as a fraction in [0, 1], if known.
        """
        return self.method.to_cmatrix(ExportInfo(self.class_names, dataset, model, top1))

    def export(self, path: str | os.PathLike, dataset: str = "", model: str = "", top1: float | None = None) -> Path:
        """Write the current C-matrix to `path` (a directory gets cmatrix.safetensors in it); returns the file.

        The file is what `ProxyTeacherLoss(path)`, `load_cmatrix` and `kd distill --proxy` read.
        """
        target = Path(path)
        if target.is_dir():
            target = target / CMATRIX_FILE
        save_cmatrix(target, self.to_cmatrix(dataset, model, top1))
        return target


class ProxyTeacherLoss(nn.Module):
    """The proxy teacher (PT-LS++, the paper's section 5.3) as a loss: `loss(logits, targets)` -> scalar.

    Soft-target cross-entropy against t = (1 - alpha) onehot(y) + alpha C[y] (for a label
    distribution s: (1 - alpha) s + alpha s @ C), C fixed, from a C-matrix file.

    Args:
        cmatrix: a `CMatrix` or the path of a cmatrix.safetensors file (fully checked on load).
        alpha: the mixing mass in [0, 1); default: the alpha recorded in the C-matrix.
        class_names: the dataset's classes, in its label order; if given, the C-matrix's
            classes must match them (a one-line `CMatrixError` otherwise).
        remap_by_name: with `class_names`, re-order the C-matrix's rows and columns to the
            dataset's order when the names are the same set in a different order.

    Move it to the network's device (`.to(device)`): C is a buffer.
    """

    def __init__(
        self,
        cmatrix: CMatrix | str | os.PathLike,
        alpha: float | None = None,
        class_names: Sequence[str] | None = None,
        remap_by_name: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(cmatrix, CMatrix):
            validate(cmatrix, "ProxyTeacherLoss: C-matrix")
            matrix, where = cmatrix, "ProxyTeacherLoss: C-matrix"
        elif isinstance(cmatrix, (str, os.PathLike)):
            matrix, where = load_cmatrix(cmatrix), str(cmatrix)
        else:
            raise KDError(f"ProxyTeacherLoss: cmatrix must be a CMatrix or a file path, got {type(cmatrix).__name__}")
        if class_names is not None:
            names = tuple(str(name) for name in class_names)
            if remap_by_name and set(names) == set(matrix.class_names) and len(names) == matrix.num_classes:
                matrix = remap_cmatrix_by_name(matrix, names)
            check_class_names(matrix, names, where)
        try:
            method = build_method("proxy", matrix.num_classes, matrix.class_names, alpha=alpha, cmatrix=matrix)
        except KDError as exc:
            raise KDError(f"ProxyTeacherLoss: {_argument_words(exc, Proxy)}") from None
        assert isinstance(method, Proxy)
        self.method = method

    @property
    def cmatrix(self) -> CMatrix:
        """The C-matrix (with its provenance) the targets come from."""
        return self.method.cmatrix_info

    @property
    def num_classes(self) -> int:
        return self.method.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.cmatrix.class_names

    @property
    def alpha(self) -> float:
        return float(self.method.hparams["alpha"])

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Soft-target cross-entropy (batch mean) for logits (N, K) and class indices (N,) or distributions (N, K)."""
        _check_batch("ProxyTeacherLoss", logits, targets, self.num_classes)
        return self.method(logits, targets, _NO_SCHEDULE)["loss"]

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The soft targets t (N, K) for class indices (N,) or label distributions (N, K)."""
        return mix_targets(targets, self.method.cmatrix, self.alpha)
