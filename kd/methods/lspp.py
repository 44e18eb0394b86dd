"""Label Smoothing++ (Chhabra et al.): a learned K x K C-matrix of class-level soft targets.

The loss itself is `kd.losses.lspp_loss` (log-space, float32, split gradients) and the exported
C-matrix `kd.losses.modules.lspp_cmatrix`, as for the public `LSPPLoss`; this file makes them a
method: the C logits as a parameter (no weight decay; kept on the method itself, so run
checkpoints name it "criterion.logits"), the `--c-loss` ablation, `--c-init FILE` (C starts from
an existing cmatrix.safetensors instead of uniform rows), and the export of cmatrix.safetensors
at the end of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd.cmatrix.artifact import CMatrix, check_class_names, file_sha256, load_cmatrix, remap_by_name, save_cmatrix
from kd.losses import C_LOSSES, DEFAULT_ALPHA, lspp_loss, remove_diagonal
from kd.losses.modules import lspp_cmatrix
from kd.methods.base import ExportInfo, Method, Param, Setup, StepContext
from kd.training.rundir import CMATRIX_FILE


class LSPP(Method):
    name = "lspp"
    summary = "LS++: (1-a) onehot + a C[y] with C learned per class; exports cmatrix.safetensors"
    stages = ("teacher",)
    params = (
        Param("alpha", DEFAULT_ALPHA, "mixing mass a in (0, 1) given to the learned C-matrix row", valid=lambda v: 0.0 < v < 1.0,
              rule="in (0, 1) (at 0 the C-matrix would never be trained)"),
        Param("c_loss", "detached", "how C is trained: detached (the paper's split symmetric CE), ce (plain CE, "
              "gradients reach C through the target) or sce (full symmetric CE updating both sides)", type=str, choices=C_LOSSES),
        Param("c_init", None, "start C from this cmatrix.safetensors (e.g. `kd cmatrix from-teacher`'s) instead of uniform rows; "
              "its classes must be the data's, in any order", type=str, metavar="FILE", default_text="uniform rows"),
    )
    exports_cmatrix = True

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        if setup.num_classes < 2:
            raise ValueError("LS++ needs at least 2 classes")
        self.c_init_sha256 = None
        if self.hparams["c_init"] is None:
            logits = torch.zeros(setup.num_classes, setup.num_classes - 1)  # uniform rows
        else:
            logits = self._initial_logits(self.hparams["c_init"], setup.class_names)
        self.logits = nn.Parameter(logits)

    def _initial_logits(self, given: str, class_names: tuple[str, ...]) -> torch.Tensor:
        """C logits whose C-matrix is the file's, in the data's class order (read while the run
        is built: a bad file is a one-line error before --out is touched).

        A file's `cmatrix` tensor is C itself (rows over the K-1 other classes summing to 1, zero
        diagonal), not the mixed target (1-a) onehot + a C, so its `alpha` (any) does not enter.
        C = softmax over each row's K-1 logits, whose inverse is their log up to a per-row
        constant. Zero entries (classes a post-hoc matrix never confused) are raised to 1e-8
        first, so their logits (about -18.4) are finite and can still be learned; C differs from
        the file's by at most (K-2) * 1e-8 per entry.
        """
        cm = load_cmatrix(given)
        if set(cm.class_names) == set(class_names):
            cm = remap_by_name(cm, class_names)
        check_class_names(cm, class_names, given)  # other names: a one-line error
        path = Path(given).resolve()
        self.hparams["c_init"], self.c_init_sha256 = str(path), file_sha256(path)  # config.json; --resume compares
        return remove_diagonal(cm.probs.double()).clamp_min(1e-8).log().float()

    def card(self) -> dict[str, Any]:
        return {**super().card(), "c_init_sha256": self.c_init_sha256}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        return lspp_loss(logits, targets, self.logits, self.hparams["alpha"], self.hparams["c_loss"])

    def target_source(self) -> str:
        return "labels+learned C"

    def no_weight_decay(self) -> set[str]:
        return {"logits"}  # decay would pull C's rows towards uniform (plain LS)

    def to_cmatrix(self, info: ExportInfo) -> CMatrix:
        """The current C-matrix as the shareable artifact (source "lspp"), as `export` writes it."""
        return lspp_cmatrix(
            self.logits, self.hparams["alpha"], self.hparams["c_loss"], info.class_names, info.dataset, info.model, info.test_top1
        )

    def export(self, run_dir: Path, info: ExportInfo) -> None:
        save_cmatrix(run_dir / CMATRIX_FILE, self.to_cmatrix(info))
