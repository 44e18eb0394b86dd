"""Classic knowledge distillation (Hinton et al. 2015): a teacher's per-sample soft predictions.

    loss = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))

(`kd.losses.hinton_loss`; the weights are named explicitly because torchdistill's and
RepDistiller's "alpha" mean opposite things). With `--logit-std` both logit vectors are
z-scored per sample before the temperature (logit standardisation, Sun et al. CVPR 2024,
`kd.losses.standardize_logits`); the authors pair it with `--temperature 2 --kd-weight 9`.

The teacher is a network run on the same augmented batch as the student, or stored soft labels
(`kd.methods.teacher.TeacherKD`).
"""

from __future__ import annotations

from typing import Any

import torch

from kd.losses import KD_CE_WEIGHT, KD_TEMPERATURE, KD_WEIGHT, hinton_loss
from kd.methods.base import Param, StepContext, non_negative, positive, weights_not_all_zero
from kd.methods.teacher import TeacherKD


class HintonKD(TeacherKD):
    name = "kd"
    summary = "classic KD (Hinton): CE plus T^2 KL to a teacher's softened outputs, per sample (--teacher RUN_DIR, a pretrained --teacher-model, or --soft-labels FILE)"
    params = (
        positive("temperature", KD_TEMPERATURE, "softmax temperature T"),
        non_negative("kd_weight", KD_WEIGHT, "weight of T^2 * KL(teacher || student)"),
        non_negative("ce_weight", KD_CE_WEIGHT, "weight of the cross-entropy with the labels"),
        Param("logit_std", False, "logit standardisation (Sun et al. 2024): z-score student and teacher logits before the temperature", type=bool),
    )

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        weights_not_all_zero(params, "kd_weight", "ce_weight")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        params = self.hparams
        return hinton_loss(logits, targets, self.teacher_logits(context), params["temperature"], params["kd_weight"],
                           params["ce_weight"], logit_std=params["logit_std"])
