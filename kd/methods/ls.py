"""Label smoothing (Szegedy et al. 2016; the paper's eq. 2): t = (1 - a) s + a / K on every class."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.lspp import DEFAULT_ALPHA, soft_target_cross_entropy
from kd.methods.base import Method, StepContext, float32, fraction

ALPHA = fraction("alpha", DEFAULT_ALPHA, "smoothing mass a in [0, 1), spread uniformly over all K classes")


class LabelSmoothing(Method):
    name = "ls"
    summary = "label smoothing: (1-a) onehot + a/K (paper eq. 2)"
    params = (ALPHA,)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        alpha = self.hparams["alpha"]
        with float32(logits):
            if targets.dim() == 1:
                return {"loss": F.cross_entropy(logits.float(), targets.long(), label_smoothing=alpha)}
            return {"loss": soft_target_cross_entropy(logits, (1.0 - alpha) * targets.float() + alpha / self.num_classes)}
