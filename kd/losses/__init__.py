"""The losses: each formula of the toolkit in one place, as functions and as loss modules.

* `kd.losses.functional` (its names are re-exported here): LS++ (the C-matrix from its
  K x (K-1) logits, the targets, the two terms and the `c_loss` variants), the proxy
  teacher's targets and loss, (label-smoothed) soft-target cross-entropy, Hinton KD (with
  logit standardisation), decoupled KD (DKD) and DIST.
* `kd.losses.modules`: `LSPPLoss` and `ProxyTeacherLoss`, `loss(logits, targets)` modules
  for any training loop (also `from kd import LSPPLoss, ProxyTeacherLoss`).

The training methods (`kd.methods`) wrap these functions. The two modules are imported on
first use: they read and write C-matrix files (`kd.cmatrix.artifact`), which are themselves
built with the formulas here, so importing them eagerly would be an import cycle.
"""

from typing import Any as _Any

from kd.losses.functional import (
    C_LOSSES,
    DEFAULT_ALPHA,
    DIST_CE_WEIGHT,
    DIST_INTER_WEIGHT,
    DIST_INTRA_WEIGHT,
    DIST_TEMPERATURE,
    DKD_CE_WEIGHT,
    DKD_NCKD_WEIGHT,
    DKD_TCKD_WEIGHT,
    DKD_TEMPERATURE,
    DKD_WARMUP_EPOCHS,
    KD_CE_WEIGHT,
    KD_TEMPERATURE,
    KD_WEIGHT,
    cmatrix_from_logits,
    cross_entropy,
    dist_loss,
    dist_terms,
    dkd_loss,
    dkd_terms,
    dkd_warmup,
    hinton_loss,
    hinton_terms,
    insert_diagonal,
    log_cmatrix_from_logits,
    log_targets,
    log_targets_from_logits,
    lspp_loss,
    lspp_terms,
    mix_targets,
    proxy_loss,
    remove_diagonal,
    soft_target_cross_entropy,
    standardize_logits,
)

_MODULES = ("LSPPLoss", "ProxyTeacherLoss")

__all__ = [
    "C_LOSSES", "DEFAULT_ALPHA", "DIST_CE_WEIGHT", "DIST_INTER_WEIGHT", "DIST_INTRA_WEIGHT", "DIST_TEMPERATURE",
    "DKD_CE_WEIGHT", "DKD_NCKD_WEIGHT", "DKD_TCKD_WEIGHT", "DKD_TEMPERATURE", "DKD_WARMUP_EPOCHS",
    "KD_CE_WEIGHT", "KD_TEMPERATURE", "KD_WEIGHT", *_MODULES,
    "cmatrix_from_logits", "cross_entropy", "dist_loss", "dist_terms", "dkd_loss", "dkd_terms", "dkd_warmup",
    "hinton_loss", "hinton_terms", "insert_diagonal", "log_cmatrix_from_logits",
    "log_targets", "log_targets_from_logits", "lspp_loss", "lspp_terms", "mix_targets", "proxy_loss", "remove_diagonal",
    "soft_target_cross_entropy", "standardize_logits",
]


def __getattr__(name: str) -> _Any:
    """`LSPPLoss` and `ProxyTeacherLoss`, imported from `kd.losses.modules` on first access."""
    if name not in _MODULES:
        raise AttributeError(f"module 'kd.losses' has no attribute {name!r}")
    from kd.losses import modules

    return getattr(modules, name)
