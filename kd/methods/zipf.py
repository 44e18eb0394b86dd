"""Zipf's label smoothing (Liang et al., "Efficient One Pass Self-distillation with Zipf's Label Smoothing", ECCV 2022).

The non-target classes get a Zipf distribution by the rank of the network's own prediction:

    rank_k = position of class k when all K logits are sorted in descending order (1-based, the label included)
    q_k    = rank_k ** -power over the non-target classes, renormalised
    loss   = CE(z, y) + weight * KL(q || softmax of z over the non-target classes)

with q detached, the KL summed over classes and averaged over the batch, as in the authors'
code (`zipf_loss`; CIFAR-100 defaults: weight 0.1, power 1). Their CIFAR results rank by
"dense" votes: the final linear layer applied at every position of the upsampled last feature
map. A method here sees only the logits, so it ranks by the logits themselves (their code's
non-dense mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.methods.base import Method, StepContext, float32, hard_labels, non_negative


class ZipfLS(Method):
    name = "zipf"
    summary = "Zipf's label smoothing: non-target mass by the rank of the network's own prediction, Zipf-distributed"
    params = (
        non_negative("zipf_weight", 0.1, "weight of the KL term towards the Zipf target"),
        non_negative("power", 1.0, "Zipf exponent: the target of the class ranked r is proportional to r ** -power"),
    )
    soft_targets = False

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        labels = hard_labels(targets, self.name)
        with float32(logits):
            z = logits.float()
            is_label = F.one_hot(labels, self.num_classes).bool()
            with torch.no_grad():
                rank = z.argsort(dim=1, descending=True).argsort(dim=1).float() + 1.0
                zipf = rank.pow(-self.hparams["power"]).masked_fill(is_label, 0.0)
                zipf = zipf / zipf.sum(dim=1, keepdim=True)
            log_q = F.log_softmax(z.masked_fill(is_label, float("-inf")), dim=1)
            # The label's column has q = 0 and log q = -inf; it contributes nothing (0 log 0 = 0).
            pointwise = torch.where(is_label, torch.zeros_like(z), zipf * (zipf.clamp(min=1e-30).log() - log_q))
            kl = pointwise.sum(dim=1).mean()
            ce = F.cross_entropy(z, labels)
        return {"loss": ce + self.hparams["zipf_weight"] * kl, "ce": ce, "kl": kl}
