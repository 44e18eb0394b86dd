"""1-hot targets: plain cross-entropy with the labels (the baseline)."""

from __future__ import annotations

import torch

from kd.losses import cross_entropy
from kd.methods.base import Method, StepContext


class OneHot(Method):
    name = "onehot"
    summary = "cross-entropy with the labels (1-hot targets), the baseline"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        return {"loss": cross_entropy(logits, targets)}
