"""FLSD-53: focal loss with a sample-dependent gamma (Mukhoti et al., NeurIPS 2020).

gamma = 5 for a sample whose true-class probability p_y is below 0.2, else 3 (p_y = 0.2
exactly gets 3), chosen from the detached probability as in the authors' code
(`focal_loss_adaptive_gamma.py`). The loss is the batch mean, as for `focal`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.methods.base import Method, StepContext, float32, hard_labels
from kd.methods.focal import focal_loss


class FLSD53(Method):
    name = "flsd"
    summary = "FLSD-53: focal loss with gamma 5 where p_y < 0.2, else 3"
    soft_targets = False

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        labels = hard_labels(targets, self.name)
        with float32(logits):
            with torch.no_grad():
                p_y = F.softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
                gamma = torch.where(p_y < 0.2, 5.0, 3.0)
            return {"loss": focal_loss(logits, labels, gamma)}
