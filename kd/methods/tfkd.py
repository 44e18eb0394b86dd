"""Teacher-free KD, regularisation variant (Tf-KD_reg; Yuan et al., CVPR 2020).

A virtual teacher gives the correct class probability p and spreads 1-p uniformly. This is
the authors' code (`loss_kd_regularization` in their my_loss_function.py) with its CIFAR-100
ResNet-18 values (T 20, alpha 0.1, multiplier 100, p 0.99):

    u    = p on the label, (1-p)/(K-1) elsewhere
    loss = (1 - alpha) * CE(z, y) + alpha * multiplier * KLDiv_mean(log_softmax(z), softmax(u / T))

where the KL divergence is averaged over all N*K elements (their `nn.KLDivLoss()` default),
not over the batch. Where the code and the paper's text differ: the paper softens the
student at T too and scales by T^2; the code leaves the student at T=1, has no T^2, and
softmaxes the virtual teacher's *probabilities* at T as if they were logits, which at T=20
makes the teacher almost uniform (about 0.105 on the label at K=10). With multiplier 100 and
the 1/K of the element mean, the KL weight is alpha * 100 / K per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.methods.base import Method, Param, StepContext, float32, hard_labels, non_negative, positive


class TeacherFreeKD(Method):
    name = "tfkd"
    summary = "teacher-free KD (Tf-KD_reg): CE plus KL to a virtual teacher (p on the label, uniform rest), as in the authors' code"
    params = (
        Param("kd_weight", 0.1, "alpha in (1-alpha) CE + alpha * multiplier * KL", valid=lambda v: 0.0 <= v <= 1.0, rule="in [0, 1]"),
        positive("temperature", 20.0, "temperature T applied to the virtual teacher"),
        Param("teacher_prob", 0.99, "the virtual teacher's probability p of the correct class",
              valid=lambda v: 0.0 < v < 1.0, rule="in (0, 1)"),
        non_negative("multiplier", 100.0, "factor on the KL term (the authors' `multiplier`)"),
    )
    soft_targets = False

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        labels = hard_labels(targets, self.name)
        k, p, t = self.num_classes, self.hparams["teacher_prob"], self.hparams["temperature"]
        alpha = self.hparams["kd_weight"]
        with float32(logits):
            virtual = torch.full(logits.shape, (1.0 - p) / (k - 1), device=logits.device)
            virtual[torch.arange(labels.numel(), device=labels.device), labels] = p
            log_p = F.log_softmax(logits.float(), dim=1)
            ce = F.nll_loss(log_p, labels)
            # Their nn.KLDivLoss() default, spelt out: the mean over all N*K elements.
            kl = F.kl_div(log_p, F.softmax(virtual / t, dim=1), reduction="sum") / log_p.numel()
        return {"loss": (1.0 - alpha) * ce + alpha * self.hparams["multiplier"] * kl, "ce": ce, "kl": kl}

    def target_source(self) -> str:
        return "labels+virtual teacher"
