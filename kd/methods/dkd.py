"""Decoupled knowledge distillation (DKD, Zhao et al., CVPR 2022): KD split into its target and non-target parts.

With p = softmax(z / T) for student s and teacher t, b = [p_y, 1 - p_y] (the target class
against the rest) and p_hat the softmax over the non-target classes only:

    loss = ce_weight * CE(s, y) + w(epoch) * (tckd_weight * TCKD + nckd_weight * NCKD)
    TCKD = T^2 KL(b_t || b_s),  NCKD = T^2 KL(p_hat_t || p_hat_s),  w = min(epoch / warmup_epochs, 1)

(`kd.losses.dkd_loss`). This is the authors' code (megvii-research/mdistiller,
`mdistiller/distillers/DKD.py`), whose T^2 the paper's equation does not have; its epoch
counts from 1, ours from 0, so w = (epoch + 1) / warmup_epochs. The defaults are mdistiller's
(`CFG.DKD`, CIFAR-100): T 4, CE weight 1, alpha 1, beta 8, 20 warm-up epochs (their per-pair
configs change beta: 2 for ResNet56-ResNet20, 6 for VGG13-VGG8; ImageNet: beta 0.5, T 1, 1 epoch).

DKD needs each sample's class index: label distributions (Mixup/CutMix) are refused. With
`--logit-std` both logit vectors are z-scored per sample before the DKD terms (logit
standardisation, Sun et al. CVPR 2024; the cross-entropy sees the raw logits), as in the
authors' `logit-standardization-KD` DKD.py; their DKD recipe with it is T 2, alpha 9, beta 72
(their `--kd-weight 9` multiplies alpha and beta).

The teacher is a network run on the same augmented batch as the student, or stored soft labels
(`kd.methods.teacher.TeacherKD`).
"""

from __future__ import annotations

from typing import Any

import torch

from kd.losses import DKD_CE_WEIGHT, DKD_NCKD_WEIGHT, DKD_TCKD_WEIGHT, DKD_TEMPERATURE, DKD_WARMUP_EPOCHS, dkd_loss, dkd_warmup
from kd.methods.base import Param, StepContext, hard_labels, non_negative, positive, weights_not_all_zero
from kd.methods.teacher import TeacherKD


class DecoupledKD(TeacherKD):
    name = "dkd"
    summary = "decoupled KD (DKD): CE plus T^2 KL terms on the target/non-target split (TCKD) and among the non-target classes (NCKD), warmed up, per sample (--teacher RUN_DIR, a pretrained --teacher-model, or --soft-labels FILE)"
    soft_targets = False
    params = (
        positive("temperature", DKD_TEMPERATURE, "softmax temperature T (the authors use 2 with --logit-std)"),
        non_negative("ce_weight", DKD_CE_WEIGHT, "weight of the cross-entropy with the labels"),
        non_negative("tckd_weight", DKD_TCKD_WEIGHT, "alpha, weight of TCKD = T^2 * KL of the target/non-target split (the authors use 9 with --logit-std)"),
        non_negative("nckd_weight", DKD_NCKD_WEIGHT, "beta, weight of NCKD = T^2 * KL among the non-target classes (the authors use 72 with --logit-std)"),
        Param("warmup_epochs", DKD_WARMUP_EPOCHS, "epochs over which the TCKD and NCKD weights ramp up linearly (0: none; not the learning-rate warm-up)",
              type=int, valid=lambda v: v >= 0, rule=">= 0"),
        Param("logit_std", False, "logit standardisation (Sun et al. 2024): z-score student and teacher logits before the temperature", type=bool),
    )

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        weights_not_all_zero(params, "ce_weight", "tckd_weight", "nckd_weight")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        params = self.hparams
        labels = hard_labels(targets, self.name)  # before the teacher runs
        return dkd_loss(logits, labels, self.teacher_logits(context), params["temperature"], params["tckd_weight"],
                        params["nckd_weight"], params["ce_weight"], logit_std=params["logit_std"],
                        warmup=dkd_warmup(context.epoch, params["warmup_epochs"]))
