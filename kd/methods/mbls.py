"""Margin-based label smoothing (MbLS; Liu et al., "The Devil is in the Margin", CVPR 2022).

    loss = CE(z, y) + margin_weight * mean over samples and classes of relu(max_j z_j - z_k - margin)

As in the authors' code (`LogitMarginL1`): the maximum runs over all classes (not detached),
the penalty is averaged over the N*K entries (the paper's equation sums over classes, so its
weight is K times this one), defaults margin 10 and weight 0.1, no schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.methods.base import Method, StepContext, float32, hard_labels, non_negative


class MarginLS(Method):
    name = "mbls"
    summary = "margin-based LS: CE plus a penalty on logit distances beyond a margin"
    params = (
        non_negative("margin", 10.0, "logit distance from the largest logit that goes unpenalised"),
        non_negative("margin_weight", 0.1, "weight of the margin penalty"),
    )
    soft_targets = False

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        labels = hard_labels(targets, self.name)
        with float32(logits):
            z = logits.float()
            ce = F.cross_entropy(z, labels)
            penalty = F.relu(z.max(dim=1, keepdim=True).values - z - self.hparams["margin"]).mean()
        return {"loss": ce + self.hparams["margin_weight"] * penalty, "ce": ce, "margin": penalty}
