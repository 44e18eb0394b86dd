"""Classic knowledge distillation (Hinton et al. 2015): a frozen teacher network's per-sample soft predictions.

    loss = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))

(`kd.losses.hinton_loss`; the weights are named explicitly because torchdistill's and
RepDistiller's "alpha" mean opposite things). The teacher lives in this module (frozen, always
in eval mode, under no_grad) and runs on the same augmented batch as the student; on every 5th
batch its forward pass is timed, which gives the share of training time the teacher costs.

The teacher is either a run directory's network (`--teacher RUN_DIR`), which takes the batch as
it is, or a pretrained timm / torchvision classifier (`--teacher-model NAME --teacher-weights
FILE`) behind its input adapter (`kd.models.pretrained.AdaptedTeacher`: de-normalise, resize,
re-normalise); the adapter is part of the teacher's forward pass, so its cost is timed with it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kd.losses import KD_CE_WEIGHT, KD_TEMPERATURE, KD_WEIGHT, hinton_loss
from kd.methods.base import Method, Setup, StepContext, non_negative, positive, weights_not_both_zero

# Every 5th teacher forward is timed (on a GPU with CUDA events, read once training is done).
_TIME_EVERY = 5


class HintonKD(Method):
    name = "kd"
    summary = "classic KD (Hinton): CE plus T^2 KL to a teacher network's softened outputs, per sample (--teacher RUN_DIR, or a pretrained --teacher-model)"
    stages = ("student",)
    needs = "teacher"
    params = (
        positive("temperature", KD_TEMPERATURE, "softmax temperature T"),
        non_negative("kd_weight", KD_WEIGHT, "weight of T^2 * KL(teacher || student)"),
        non_negative("ce_weight", KD_CE_WEIGHT, "weight of the cross-entropy with the labels"),
    )

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        weights_not_both_zero(params, "kd_weight", "ce_weight")

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.teacher = setup.teacher.requires_grad_(False).eval()
        self.teacher_model = setup.teacher_model
        self.calls = 0
        self.timed_calls = 0
        self.teacher_seconds = 0.0
        self.cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def train(self, mode: bool = True) -> "HintonKD":
        super().train(mode)
        self.teacher.eval()
        return self

    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        timed = self.calls % _TIME_EVERY == 0
        self.calls += 1
        if not timed:
            with torch.no_grad():
                return self.teacher(images)
        self.timed_calls += 1
        if images.device.type == "cuda":  # CUDA events: timed on the stream, read after training (no sync here)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.no_grad():
                logits = self.teacher(images)
            end.record()
            self.cuda_events.append((start, end))
            return logits
        started = time.perf_counter()
        with torch.no_grad():
            logits = self.teacher(images)
        self.teacher_seconds += time.perf_counter() - started
        return logits

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        teacher_logits = self._teacher_logits(context.images)
        params = self.hparams
        return hinton_loss(logits, targets, teacher_logits, params["temperature"], params["kd_weight"], params["ce_weight"])

    def target_source(self) -> str:
        return f"teacher {self.teacher_model} (per sample)"

    def train_metrics(self, train_seconds: float) -> dict[str, Any]:
        """The teacher forward's share of training time: its mean timed cost times every call."""
        if self.cuda_events:
            self.cuda_events[-1][1].synchronize()
            self.teacher_seconds += sum(start.elapsed_time(end) for start, end in self.cuda_events) / 1000.0
            self.cuda_events.clear()
        if not self.timed_calls or train_seconds <= 0:
            return {"teacher_forward_share": None}
        estimate = self.teacher_seconds / self.timed_calls * self.calls
        return {"teacher_forward_share": min(estimate / train_seconds, 1.0)}
