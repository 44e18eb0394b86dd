"""Focal loss with a fixed gamma (Lin et al. 2017; FL-3 in Mukhoti et al., NeurIPS 2020).

    loss = mean over samples of -(1 - p_y) ** gamma * log p_y

The calibration paper's code sums over the batch (and clips gradient norms at 2); the mean
here keeps the loss on the scale of cross-entropy, so the same learning rate applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.methods.base import Method, StepContext, float32, hard_labels, non_negative


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """-(1 - p_y) ** gamma * log p_y, batch mean; `gamma` a number or one per sample."""
    log_p_y = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return -((1.0 - log_p_y.exp()).pow(gamma) * log_p_y).mean()


class Focal(Method):
    name = "focal"
    summary = "focal loss -(1-p_y)^gamma log p_y (FL-3 at the default gamma 3)"
    params = (non_negative("gamma", 3.0, "focusing exponent gamma"),)
    soft_targets = False

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        with float32(logits):
            return {"loss": focal_loss(logits, hard_labels(targets, self.name), self.hparams["gamma"])}
