"""DIST (Huang et al., NeurIPS 2022): distillation by correlation, between and within classes.

With y = softmax(z / tau) for student s and teacher t (N x K) and pearson(a, b) the cosine of
the centred vectors (eps 1e-8 in the denominator):

    inter = 1 - mean_i pearson(y_s[i, :], y_t[i, :])   (each sample's prediction, over the classes)
    intra = 1 - mean_k pearson(y_s[:, k], y_t[:, k])   (each class's predictions, over the batch)
    loss  = ce_weight * CE(s, y) + tau^2 * (inter_weight * inter + intra_weight * intra)

(`kd.losses.dist_loss`), as in the authors' code (hunto/DIST_KD,
`classification/lib/models/losses/dist_kd.py`). The defaults are their CIFAR-100 values: tau 4,
beta = gamma = 2, CE weight 1 (ImageNet: tau 1, beta = gamma = 1). The intra term depends on the
batch: it is computed over each process's batch, as in their code. The cross-entropy takes label
distributions too (Mixup/CutMix).

The teacher is a network run on the same augmented batch as the student, or stored soft labels
(`kd.methods.teacher.TeacherKD`).
"""

from __future__ import annotations

from typing import Any

import torch

from kd.losses import DIST_CE_WEIGHT, DIST_INTER_WEIGHT, DIST_INTRA_WEIGHT, DIST_TEMPERATURE, dist_loss
from kd.methods.base import StepContext, non_negative, positive, weights_not_all_zero
from kd.methods.teacher import TeacherKD


class DIST(TeacherKD):
    name = "dist"
    summary = "DIST: CE plus tau^2 (1 - Pearson correlation) with a teacher's softened outputs, per sample (inter) and per class over the batch (intra) (--teacher RUN_DIR, a pretrained --teacher-model, or --soft-labels FILE)"
    params = (
        positive("temperature", DIST_TEMPERATURE, "softmax temperature tau"),
        non_negative("ce_weight", DIST_CE_WEIGHT, "weight of the cross-entropy with the labels"),
        non_negative("inter_weight", DIST_INTER_WEIGHT, "beta, weight of tau^2 * inter-class relation (1 - Pearson per sample)"),
        non_negative("intra_weight", DIST_INTRA_WEIGHT, "gamma, weight of tau^2 * intra-class relation (1 - Pearson per class over the batch)"),
    )

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        weights_not_all_zero(params, "ce_weight", "inter_weight", "intra_weight")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        params = self.hparams
        return dist_loss(logits, targets, self.teacher_logits(context), params["temperature"], params["inter_weight"],
                         params["intra_weight"], params["ce_weight"])
