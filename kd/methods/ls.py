"""Label smoothing (Szegedy et al. 2016; the paper's eq. 2): t = (1 - a) s + a / K on every class."""

from __future__ import annotations

import torch

from kd.losses import DEFAULT_ALPHA, cross_entropy
from kd.methods.base import Method, StepContext, fraction

ALPHA = fraction("alpha", DEFAULT_ALPHA, "smoothing mass a in [0, 1), spread uniformly over all K classes")


class LabelSmoothing(Method):
    name = "ls"
    summary = "label smoothing: (1-a) onehot + a/K (paper eq. 2)"
    params = (ALPHA,)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        return {"loss": cross_entropy(logits, targets, label_smoothing=self.hparams["alpha"])}
