"""The optimizer and its schedule: SGD with Nesterov momentum, linear warm-up then cosine decay,
counted in optimizer steps (`Plan`: how many, and how they fall into epochs)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd.errors import KDError

MOMENTUM = 0.9
WARMUP_FRACTION = 0.03  # of the run's optimizer steps


def param_groups_weight_decay(
    module: nn.Module, weight_decay: float, no_weight_decay_list: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Optimizer parameter groups as timm's `timm.optim.param_groups_weight_decay` makes them.

    Trainable parameters with ndim <= 1, a name ending in ".bias", or a name matching a pattern
    of `no_weight_decay_list` (fnmatch) get weight decay 0, the others `weight_decay`; with a
    zero `weight_decay` all are in the first group. Groups: no-decay first, then decay, empty
    ones left out; parameters in `named_parameters()` order. The same groups in the same order
    as timm's, without importing timm (and with it torchvision) for every run.
    """
    no_decay: list[nn.Parameter] = []
    decay: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        excluded = (
            not weight_decay
            or param.ndim <= 1
            or name.endswith(".bias")
            or any(fnmatch.fnmatch(name, pattern) for pattern in no_weight_decay_list)
        )
        (no_decay if excluded else decay).append(param)
    groups: list[dict[str, Any]] = []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    return groups


def layer_decay_groups(net: nn.Module, weight_decay: float, layer_decay: float, num_classes: int) -> list[dict[str, Any]]:
    """timm's layer-wise learning-rate decay groups for `net` (`timm.optim.param_groups_layer_decay`):
    each group's "lr_scale" is layer_decay ** (layers above it), the classifier's 1.

    timm models group their layers with their own `group_matcher`; other networks (torchvision's,
    the built-ins) by timm's automatic grouping, which needs to know the classifier.
    """
    from timm.optim import param_groups_layer_decay

    from kd.models.weights import classifier_names

    if not hasattr(net, "group_matcher") and not (getattr(net, "pretrained_cfg", None) or {}).get("classifier"):
        net.pretrained_cfg = {"classifier": classifier_names(net, num_classes)}  # where timm's grouping looks for the head
    no_decay = net.no_weight_decay() if hasattr(net, "no_weight_decay") else ()
    return param_groups_layer_decay(net, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, momentum: float = MOMENTUM,
                    layer_decay: float | None = None, num_classes: int | None = None) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; no weight decay on biases, norms or `no_weight_decay()` names.

    With `layer_decay` (a `TrainModule`, whose network has `num_classes` outputs) the network's
    groups take timm's layer-wise rates (`layer_decay_groups`); the method's own parameters (the
    C logits) and the classifier learn at the full rate.
    """
    if layer_decay is None:
        groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=module.no_weight_decay())
    else:
        own = {name.removeprefix("criterion.") for name in module.no_weight_decay() if name.startswith("criterion.")}
        groups = (layer_decay_groups(module.net, weight_decay, layer_decay, num_classes)
                  + param_groups_weight_decay(module.criterion, weight_decay, no_weight_decay_list=own))
        for group in groups:
            group["lr"] = lr * group.pop("lr_scale", 1.0)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


class HeadOnlyEpochs:
    """`--head-only-epochs N`: a linear probe, then fine-tuning. For the first N epochs only the
    classifier and the method's own parameters (the C logits) learn: the network body's gradients
    are dropped before each step (SGD then leaves those weights, their momentum and their decay
    alone) and its BatchNorm layers keep their running statistics (eval mode)."""

    def __init__(self, net: nn.Module, num_classes: int, epochs: int) -> None:
        from kd.models.weights import classifier_names

        heads = classifier_names(net, num_classes) if epochs else ()
        in_head = {id(p) for name in heads for p in net.get_submodule(name).parameters()}
        self.epochs = epochs
        self.body = [p for p in net.parameters() if id(p) not in in_head]
        self.norms = [m for name, m in net.named_modules()
                      if isinstance(m, nn.modules.batchnorm._NormBase) and not any(name.startswith(h) for h in heads)]

    def start_epoch(self, epoch: int) -> None:
        if epoch < self.epochs:
            for norm in self.norms:
                norm.eval()

    def before_step(self, epoch: int) -> None:
        if epoch < self.epochs:
            for param in self.body:
                param.grad = None


class WarmupCosine:
    """Linear warm-up then cosine decay to zero, per optimizer step (a picklable LambdaLR factor)."""

    def __init__(self, total_steps: int, warmup_steps: int) -> None:
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = max(warmup_steps, 0)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`WarmupCosine` over `total_steps`, the first `warmup_fraction` of them warming up.

    The loop steps it by hand once per optimizer step: Accelerate's wrapper would step it once
    per process, but `total_steps` already counts per-process steps.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps=round(warmup_fraction * total_steps)))


def optimizer_steps_per_epoch(num_samples: int, batch_size: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch (whole accumulation groups of whole batches); a `KDError` if none fit."""
    batches = max(math.ceil(num_samples / world_size) // batch_size, 1)
    if batches < grad_accum:
        raise KDError(
            f"--grad-accum {grad_accum} needs at least {grad_accum} batches per epoch and process, but there "
            f"are {batches} (--batch-size {batch_size}, {world_size} process(es)): lower --grad-accum or --batch-size"
        )
    return batches // grad_accum


@dataclass
class Plan:
    """How many optimizer steps the run takes, and how they fall into epochs."""

    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, steps_per_epoch: int, epochs: int, max_steps: int | None) -> Plan:
        total_steps = steps_per_epoch * epochs
        return cls(steps_per_epoch, total_steps if max_steps is None else min(total_steps, max_steps))

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def end_of(self, epoch: int) -> int:
        """The step count once `epoch` is done."""
        return epoch * self.steps_per_epoch + self.steps_in(epoch)

    def first_epoch(self, step: int) -> int:
        return step // self.steps_per_epoch if step < self.total_steps else self.epochs
