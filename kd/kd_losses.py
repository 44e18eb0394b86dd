"""Student-stage criteria: the proxy teacher (PT-LS++) and classic per-sample KD (Hinton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.lspp import mix_targets, soft_target_cross_entropy


# Hinton KD defaults: temperature, weight of T^2 * KL, weight of the cross-entropy with the labels.
KD_TEMPERATURE, KD_WEIGHT, KD_CE_WEIGHT = 4.0, 0.9, 0.1


class ProxyTeacherLoss(nn.Module):
    """PT-LS++ (paper section 5.3): cross-entropy against (1-a) * onehot(y) + a * C[y].

    C is a fixed K x K matrix from a C-matrix file (a buffer, not a parameter): the targets
    are class-level, so no teacher network is loaded or run. Soft label distributions
    (Mixup/CutMix) go through the same linear map, (1-a) * s + a * (s @ C).
    """

    def __init__(self, cmatrix: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.register_buffer("cmatrix", cmatrix.detach().float().clone())
        self.alpha = float(alpha)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return mix_targets(labels, self.cmatrix, self.alpha)

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return soft_target_cross_entropy(student_logits, self.targets(labels))


def hinton_terms(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(s, y), KL(softmax(t / T) || softmax(s / T))), batch means in float32 even under mixed precision.

    `targets` are class indices (N,) or label distributions (N, K) (soft cross-entropy then).
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student = student_logits.float()
        ce = F.cross_entropy(student, targets.long()) if targets.dim() == 1 else soft_target_cross_entropy(student, targets)
        kl = F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher_logits.float() / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
    return ce, kl


class HintonKDLoss(nn.Module):
    """ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T)).

    The weights are named explicitly because torchdistill's and RepDistiller's "alpha" mean
    opposite things. Computed in float32 even under mixed precision.
    """

    def __init__(self, temperature: float = KD_TEMPERATURE, kd_weight: float = KD_WEIGHT, ce_weight: float = KD_CE_WEIGHT) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)
        self.ce_weight = float(ce_weight)

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        ce, kl = hinton_terms(student_logits, labels, teacher_logits, self.temperature)
        return self.ce_weight * ce + self.kd_weight * self.temperature**2 * kl
