"""Run a teacher once over a training split and keep its logits per sample (`kd soft-labels`)."""

from __future__ import annotations

import os

from accelerate import Accelerator

from kd.data.datasets import ImageDataset, sample_names
from kd.data.fingerprint import data_fingerprint
from kd.models.pretrained import Teacher
from kd.softlabels.artifact import DEFAULT_TOP_K, WHOLE_ROW_MAX, SoftLabelFile
from kd.training.evaluate import predict


def default_top_k(num_classes: int) -> int:
    """The whole row up to `WHOLE_ROW_MAX` classes, else the top `DEFAULT_TOP_K`."""
    return num_classes if num_classes <= WHOLE_ROW_MAX else DEFAULT_TOP_K


def teacher_soft_labels(teacher: Teacher, data: ImageDataset, dataset: str, data_dir: str | os.PathLike | None,
                        batch_size: int, accelerator: Accelerator, top_k: int | None = None) -> SoftLabelFile:
    """`teacher`'s logits for every sample of `data`'s training split, un-augmented (the evaluation view)."""
    logits, _ = predict(teacher.net, data, "train", batch_size, accelerator)
    adapter = ", through the teacher's input adapter" if "teacher_input" in teacher.record else ""
    extra = teacher.shared_record()
    if teacher.top1 is not None:
        extra["teacher_top1"] = repr(float(teacher.top1))
    return SoftLabelFile.from_logits(
        logits, top_k if top_k is not None else default_top_k(data.num_classes),
        sample_names=sample_names(data.train), class_names=tuple(data.class_names), dataset=data.name,
        data_fingerprint=data_fingerprint(data, dataset, data_dir), teacher_model=teacher.model,
        view=f"un-augmented {data.channels}x{data.image_size}x{data.image_size} training images (evaluation view{adapter})",
        extra=extra,
    )
