"""1-hot targets: plain cross-entropy with the labels (the baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.lspp import soft_target_cross_entropy
from kd.methods.base import Method, StepContext, float32


class OneHot(Method):
    name = "onehot"
    summary = "cross-entropy with the labels (1-hot targets), the baseline"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        with float32(logits):
            if targets.dim() == 1:
                return {"loss": F.cross_entropy(logits.float(), targets.long())}
            return {"loss": soft_target_cross_entropy(logits, targets)}
