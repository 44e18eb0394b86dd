"""What every per-sample KD method (kd, dkd, dist) shares: where the teacher's logits come from.

The teacher is either

* a frozen network (`--teacher RUN_DIR`, or a pretrained `--teacher-model NAME` behind its input
  adapter, `kd.models.pretrained.AdaptedTeacher`), always in eval mode and under no_grad, run on
  the same augmented batch as the student; every 5th forward pass is timed, which gives the
  share of training time the teacher costs (`teacher_forward_share`); or
* stored soft labels (`--soft-labels FILE`, `kd.softlabels.SoftLabels`): the teacher ran once,
  on the un-augmented training images, and a step looks its logits up by sample index, at the
  cost of a plain step.

A method subclasses `TeacherKD`, declares its parameters and computes its loss from
`self.teacher_logits(context)`.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from kd.methods.base import Method, Setup, StepContext

# Every 5th teacher forward is timed (on a GPU with CUDA events, read once training is done).
_TIME_EVERY = 5


class TeacherKD(Method):
    """Base class of the per-sample KD methods: a teacher network or stored soft labels."""

    stages: ClassVar[tuple[str, ...]] = ("student",)
    needs: ClassVar[str | None] = "teacher"

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.teacher = setup.teacher.requires_grad_(False).eval()
        self.teacher_model = setup.teacher_model
        self.stored = bool(getattr(self.teacher, "stored", False))
        self.calls = 0
        self.timed_calls = 0
        self.teacher_seconds = 0.0
        self.cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def train(self, mode: bool = True) -> "TeacherKD":
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_logits(self, context: StepContext) -> torch.Tensor:
        """The teacher's logits for this batch: looked up by sample index, or a (sometimes timed) forward pass."""
        if self.stored:
            return self.teacher(context.indices)
        images = context.images
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

    def target_source(self) -> str:
        if self.stored:
            return f"stored soft labels of {self.teacher_model} (per sample, un-augmented images)"
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
