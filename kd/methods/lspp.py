"""Label Smoothing++ (Chhabra et al.): a learned K x K C-matrix of class-level soft targets.

The loss itself is `kd.losses.lspp_loss` (log-space, float32, split gradients) and the exported
C-matrix `kd.losses.modules.lspp_cmatrix`, as for the public `LSPPLoss`; this file makes them a
method: the C logits as a parameter (no weight decay; kept on the method itself, so run
checkpoints name it "criterion.logits"), the `--c-loss` ablation, and the export of
cmatrix.safetensors at the end of training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kd.cmatrix.artifact import CMatrix, save_cmatrix
from kd.losses import C_LOSSES, DEFAULT_ALPHA, lspp_loss
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
    )
    exports_cmatrix = True

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        if setup.num_classes < 2:
            raise ValueError("LS++ needs at least 2 classes")
        self.logits = nn.Parameter(torch.zeros(setup.num_classes, setup.num_classes - 1))

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
