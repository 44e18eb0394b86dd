"""Online Label Smoothing (Zhang et al., "Delving Deep into Label Smoothing", IEEE TIP 2021).

Per class, the mean softmax output of the correctly classified training samples over one
epoch becomes that class's soft label for the next epoch. As in the authors' CIFAR/ImageNet
code: the soft-label matrix S starts at zero (the first epoch trains on the hard term only),
the statistics come from the training forward pass itself (detached, temperature 1), a
class with no correct sample in an epoch gets a uniform row, and the loss is
0.5 * CE(z, y) + 0.5 * H(S[y], p).

The accumulators are summed over all processes at each epoch end, so every rank swaps in the
same matrix; until then they differ per rank and travel in checkpoints per rank. S itself is a
buffer of the module, saved with the model.

S is a class-level soft label like LS++'s C: `export` writes it as cmatrix.safetensors
(diagonal removed, rows renormalised, source "ols"), so `kd distill --proxy` can use it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from kd.cmatrix.artifact import CMatrix, save_cmatrix
from kd.methods.base import (
    EpochContext, ExportInfo, Method, Setup, StepContext, float32, hard_labels, non_negative, weights_not_all_zero,
)
from kd.training.rundir import CMATRIX_FILE


class OLS(Method):
    name = "ols"
    summary = "Online Label Smoothing: each class's mean softmax over last epoch's correct samples is its soft label; exports it as a C-matrix"
    stages = ("teacher",)
    params = (
        non_negative("ce_weight", 0.5, "weight of the cross-entropy with the labels"),
        non_negative("soft_weight", 0.5, "weight of the cross-entropy with the online soft labels"),
    )
    soft_targets = False
    exports_cmatrix = True

    @classmethod
    def check_params(cls, params: dict) -> None:
        weights_not_all_zero(params, "ce_weight", "soft_weight")

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        k = setup.num_classes
        self.register_buffer("soft_labels", torch.zeros(k, k))
        self.register_buffer("sums", torch.zeros(k, k), persistent=False)
        self.register_buffer("counts", torch.zeros(k), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        labels = hard_labels(targets, self.name)
        with float32(logits):
            log_p = F.log_softmax(logits.float(), dim=1)
            if self.training:
                with torch.no_grad():
                    p = log_p.exp()
                    correct = (p.argmax(dim=1) == labels).float()  # weights, not a mask: no device sync
                    self.sums.index_add_(0, labels, p * correct[:, None])
                    self.counts.index_add_(0, labels, correct)
            hard = F.nll_loss(log_p, labels)
            soft = -(self.soft_labels[labels] * log_p).sum(dim=1).mean()
        loss = self.hparams["ce_weight"] * hard + self.hparams["soft_weight"] * soft
        return {"loss": loss, "hard": hard, "soft": soft}

    def target_source(self) -> str:
        return "labels+online soft labels"

    @torch.no_grad()
    def on_epoch_end(self, context: EpochContext) -> None:
        sums, counts = context.all_reduce_sum(self.sums), context.all_reduce_sum(self.counts)
        uniform = torch.full_like(sums, 1.0 / self.num_classes)
        self.soft_labels.copy_(torch.where(counts[:, None] > 0, sums / counts.clamp(min=1.0)[:, None], uniform))
        self.sums.zero_()
        self.counts.zero_()

    def rank_state(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums, "counts": self.counts}

    def cmatrix_probs(self) -> torch.Tensor:
        """S without its diagonal, rows renormalised; a row with no off-diagonal mass becomes uniform."""
        k = self.num_classes
        off = self.soft_labels.detach().float().cpu() * (1.0 - torch.eye(k))
        mass = off.sum(dim=1, keepdim=True)
        uniform = (1.0 - torch.eye(k)) / (k - 1)
        return torch.where(mass > 0, off / mass.clamp(min=torch.finfo(torch.float32).tiny), uniform)

    def export(self, run_dir: Path, info: ExportInfo) -> None:
        # The file's alpha: the mean non-target mass of OLS's own training targets,
        # (soft_weight * (1 - S[y, y])) / (ce_weight + soft_weight), the mass a proxy student mixes in.
        ce_weight, soft_weight = self.hparams["ce_weight"], self.hparams["soft_weight"]
        non_target = 1.0 - self.soft_labels.detach().float().cpu().diagonal()
        alpha = float((soft_weight * non_target).mean() / max(ce_weight + soft_weight, 1e-12))
        save_cmatrix(
            run_dir / CMATRIX_FILE,
            CMatrix.from_probs(
                self.cmatrix_probs(), class_names=info.class_names, alpha=min(max(alpha, 0.0), 0.999),
                source="ols", dataset=info.dataset, teacher_model=info.model, teacher_top1=info.test_top1,
            ),
        )
