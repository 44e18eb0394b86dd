"""A C-matrix estimated after the fact from any trained classifier (source = posthoc).

For each true class y: the network's predicted distribution over the other classes
(p with p_y removed, renormalised), averaged over the training images of class y, with a
zero diagonal and rows summing to 1. This turns any teacher, including one trained without
LS++, into a proxy teacher.

The teacher is a `kd.models.pretrained.Teacher`: a run directory's network or a pretrained timm /
torchvision classifier behind its input adapter; both take the dataset's batches, so one code
path (`posthoc_cmatrix`) serves both.
"""

from __future__ import annotations


import torch
from accelerate import Accelerator
from torch import nn

from kd.cmatrix.artifact import CMatrix
from kd.data.datasets import ImageDataset
from kd.errors import KDError
from kd.losses import DEFAULT_ALPHA
from kd.models.pretrained import Teacher
from kd.training.evaluate import predict

_ROWS = 65536  # images per slice of the estimate


def estimate_cmatrix(net: nn.Module, data: ImageDataset, batch_size: int, accelerator: Accelerator) -> torch.Tensor:
    """K x K float32 matrix from one pass over the (un-augmented) training split."""
    k = data.num_classes
    logits, labels = predict(net, data, "train", batch_size, accelerator)
    sums = torch.zeros(k, k, dtype=torch.float64)
    for start in range(0, len(labels), _ROWS):  # float64 probabilities a slice at a time
        chunk = labels[start : start + _ROWS]
        probs = torch.softmax(logits[start : start + _ROWS], dim=1).double()
        probs[torch.arange(len(chunk)), chunk] = 0.0
        sums.index_add_(0, chunk, probs / probs.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))
    counts = torch.bincount(labels, minlength=k).double()
    empty = [data.class_names[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise KDError(f"no training images for class(es) {', '.join(empty[:5])}: cannot estimate their rows")
    cmatrix = sums / counts[:, None]
    cmatrix.fill_diagonal_(0.0)
    return (cmatrix / cmatrix.sum(dim=1, keepdim=True)).float()


def posthoc_cmatrix(
    teacher: Teacher, data: ImageDataset, batch_size: int, accelerator: Accelerator, alpha: float | None = None
) -> CMatrix:
    """The posthoc C-matrix of `teacher` over `data`'s training split, with its provenance.

    `alpha` defaults to the teacher's own (an LS++ / LS run), else the paper's 0.1. For a
    pretrained teacher, the file's extra metadata records its weights file (base name) and
    that file's SHA-256.
    """
    alpha = alpha if alpha is not None else (teacher.alpha or DEFAULT_ALPHA)
    if not 0.0 <= alpha < 1.0:
        raise KDError(f"--alpha must be in [0, 1), got {alpha}")
    probs = estimate_cmatrix(teacher.net, data, batch_size, accelerator)
    extra = teacher.shared_record()
    return CMatrix.from_probs(
        probs, class_names=data.class_names, alpha=alpha, source="posthoc", dataset=data.name,
        teacher_model=teacher.model, teacher_top1=teacher.top1, extra=extra,
    )
