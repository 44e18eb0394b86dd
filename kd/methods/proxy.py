"""The proxy teacher (PT-LS++, paper section 5.3): class-level soft targets from a C-matrix file.

Target (1-a) onehot(y) + a C[y]; for a label distribution s (Mixup/CutMix), (1-a) s + a (s @ C).
C is a fixed buffer: no teacher network is loaded or run, so a step costs what plain
training costs. The loss is `kd.losses.proxy_loss`, as for the public `ProxyTeacherLoss`.
"""

from __future__ import annotations

import torch

from kd.losses import proxy_loss
from kd.methods.base import Method, Param, Setup, StepContext, fraction


class Proxy(Method):
    name = "proxy"
    summary = "proxy teacher (PT-LS++): (1-a) onehot + a C[y] from a C-matrix file, no teacher network (--proxy FILE)"
    stages = ("student",)
    needs = "cmatrix"
    params = (
        fraction("alpha", None, "mixing mass a in [0, 1) given to C[y]"),
        Param("remap_by_name", False, "re-order the C-matrix's rows and columns to the dataset's class order by name", type=bool),
    )

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.cmatrix_info = setup.cmatrix
        if self.hparams["alpha"] is None:
            self.hparams["alpha"] = setup.cmatrix.alpha
        self.register_buffer("cmatrix", setup.cmatrix.probs.detach().float().clone())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        return {"loss": proxy_loss(logits, targets, self.cmatrix, self.hparams["alpha"])}

    def target_source(self) -> str:
        return f"C-matrix ({self.cmatrix_info.source}, {self.cmatrix_info.teacher_model or '?'})"
