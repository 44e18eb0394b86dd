"""LS++ and its proxy teacher as ordinary PyTorch losses, for any classifier and training loop.

Both are `nn.Module`s called as `loss(logits, targets)` and returning a scalar tensor (timm's
convention); `targets` are class indices (N,) or label distributions (N, K) (Mixup/CutMix).

* `LSPPLoss` trains a network with Label Smoothing++ and owns the learnable C logits, a
  parameter: give `loss.parameters()` to the optimizer (without weight decay), move the loss
  to the network's device, and `loss.export(path)` the learned C-matrix at the end.
* `ProxyTeacherLoss` trains a student from a C-matrix (a `CMatrix` or a cmatrix.safetensors
  path) alone: targets (1 - a) onehot(y) + a C[y], no teacher network.

They compute with the functions the toolkit's `lspp` and `proxy` methods compute with
(`kd.losses.functional`), so they give exactly what `kd train-teacher --method lspp` and
`kd distill --proxy FILE` give.

Under DistributedDataParallel the C logits must sit inside the module DDP wraps (put the
network and the `LSPPLoss` in one `nn.Module`), or their gradients are not all-reduced.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kd.cmatrix.artifact import CMatrix, check_class_names, load_cmatrix, save_cmatrix, validate
from kd.cmatrix.artifact import remap_by_name as remap_cmatrix_by_name
from kd.errors import KDError
from kd.losses.functional import C_LOSSES, DEFAULT_ALPHA, log_targets_from_logits, lspp_loss, mix_targets, proxy_loss
from kd.training.rundir import CMATRIX_FILE

__all__ = ["LSPPLoss", "ProxyTeacherLoss", "lspp_cmatrix"]


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


def _class_names(owner: str, num_classes: int, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """The K class names as strings ("0".."K-1" if not given); a one-line `KDError` if they do not fit."""
    if class_names is None:
        return tuple(str(i) for i in range(num_classes))
    names = tuple(str(name) for name in class_names)
    if len(names) != num_classes:
        raise KDError(f"{owner}: {len(names)} class names for {num_classes} classes")
    if len(set(names)) != len(names) or not all(names):
        raise KDError(f"{owner}: class names must be non-empty and unique")
    return names


def lspp_cmatrix(
    c_logits: torch.Tensor,
    alpha: float,
    c_loss: str,
    class_names: Sequence[str],
    dataset: str = "",
    model: str = "",
    top1: float | None = None,
) -> CMatrix:
    """The shareable C-matrix (source "lspp") of LS++ C logits; a variant other than "detached" is recorded."""
    extra = {} if c_loss == "detached" else {"c_loss": c_loss}
    return CMatrix.from_logits(
        c_logits.detach().float().cpu(), class_names=class_names, alpha=alpha,
        source="lspp", dataset=dataset, teacher_model=model, teacher_top1=top1, extra=extra,
    )


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
        self.class_names = _class_names("LSPPLoss", num_classes, class_names)
        if not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
            raise KDError(f"LSPPLoss: alpha must be in (0, 1) (at 0 the C-matrix would never be trained), got {alpha!r}")
        if c_loss not in C_LOSSES:
            raise KDError(f"LSPPLoss: c_loss must be one of {', '.join(C_LOSSES)}, got {c_loss!r}")
        self.num_classes = num_classes
        self.alpha = float(alpha)
        self.c_loss = c_loss
        # The learnable K x (K-1) C logits (row y lists class y's logits for every column but y).
        self.c_logits = nn.Parameter(torch.zeros(num_classes, num_classes - 1))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The LS++ loss (batch mean) for network logits (N, K) and class indices (N,) or distributions (N, K)."""
        _check_batch("LSPPLoss", logits, targets, self.num_classes)
        return lspp_loss(logits, targets, self.c_logits, self.alpha, self.c_loss)["loss"]

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The current soft targets t (N, K) for class indices (N,) or label distributions (N, K)."""
        return log_targets_from_logits(targets, self.c_logits, self.alpha).exp()

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that must not be weight-decayed: the C logits."""
        return {"c_logits"}

    def to_cmatrix(self, dataset: str = "", model: str = "", top1: float | None = None) -> CMatrix:
        """The current C-matrix as a shareable `CMatrix` (source "lspp"), with optional provenance.

        `top1` is the network's test accuracy as a fraction in [0, 1], if known.
        """
        return lspp_cmatrix(self.c_logits, self.alpha, self.c_loss, self.class_names, dataset, model, top1)

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

    Move it to the network's device (`.to(device)`): C is a buffer (`probs`).
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
        alpha = matrix.alpha if alpha is None else alpha
        if not isinstance(alpha, numbers.Real) or not 0.0 <= alpha < 1.0:
            raise KDError(f"ProxyTeacherLoss: alpha must be in [0, 1), got {alpha!r}")
        self.cmatrix = matrix  # the C-matrix with its provenance
        self.alpha = float(alpha)
        self.register_buffer("probs", matrix.probs.detach().float().clone())

    @property
    def num_classes(self) -> int:
        return self.cmatrix.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.cmatrix.class_names

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Soft-target cross-entropy (batch mean) for logits (N, K) and class indices (N,) or distributions (N, K)."""
        _check_batch("ProxyTeacherLoss", logits, targets, self.num_classes)
        return proxy_loss(logits, targets, self.probs, self.alpha)

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The soft targets t (N, K) for class indices (N,) or label distributions (N, K)."""
        return mix_targets(targets, self.probs, self.alpha)
