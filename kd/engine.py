"""The one training engine, on Accelerate: one CPU, one GPU, many processes, mixed precision.

A stage hands in a network and a criterion; the engine owns the loop, the optimizer and
schedule, progress display, timing and evaluation. Stages differ only in where targets come
from and which loss they use (the criterion).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from timm.optim import param_groups_weight_decay
from torch import nn
from tqdm.auto import tqdm

from kd.datasets import ImageDataset
from kd.loader import DeviceBatches
from kd.metrics import classification_metrics


# Reading the loss forces a device sync, so the bar's loss and img/s refresh every few steps.
_PROGRESS_EVERY = 20
# The teacher's share of step time is measured on every Nth step only: timing needs device
# syncs, which would slow a GPU pipeline if done on every step.
_TIME_TEACHER_EVERY = 5


class TrainModule(nn.Module):
    """The network, its criterion and, for classic KD, a frozen teacher, in one module.

    `accelerator.prepare` wraps this whole module, so under DDP the criterion's own
    parameters (the LS++ C logits) have their gradients all-reduced exactly like the
    network's, and under mixed precision the forward runs in autocast (criteria compute
    their loss in float32 themselves). The teacher has no trainable parameters, stays in
    eval mode and runs under no_grad.
    """

    def __init__(self, net: nn.Module, criterion: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        self.criterion = criterion
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.time_teacher = False  # set by the engine on the steps it samples for timing
        self.teacher_seconds = 0.0

    def train(self, mode: bool = True) -> "TrainModule":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(images)
        if self.teacher is None:
            return self.criterion(logits, labels), logits
        if self.time_teacher:
            _synchronize(images.device)
            started = time.perf_counter()
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        if self.time_teacher:
            _synchronize(images.device)
            self.teacher_seconds += time.perf_counter() - started
        return self.criterion(logits, labels, teacher_logits), logits

    def no_weight_decay(self) -> set[str]:
        names: set[str] = set()
        for prefix, part in (("net", self.net), ("criterion", self.criterion)):
            if hasattr(part, "no_weight_decay"):
                names |= {f"{prefix}.{name}" for name in part.no_weight_decay()}
        return names


@dataclass
class FitConfig:
    epochs: int
    batch_size: int  # per process
    lr: float
    weight_decay: float
    seed: int = 0
    max_steps: int | None = None
    momentum: float = 0.9
    warmup_fraction: float = 0.03
    evaluate: bool = True  # benchmarks that only time training steps skip the test pass


@dataclass
class FitResult:
    metrics: dict[str, float]  # test_top1, test_nll, test_ece, test_mean_confidence
    train_seconds: float
    images_per_second: float
    steps: int
    epochs: int
    epoch_train_loss: list[float] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""
    teacher_forward_share: float | None = None  # classic KD: share of step time in the teacher's forward


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; no weight decay on biases, norms or `no_weight_decay()` names."""
    groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=module.no_weight_decay())
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


@torch.no_grad()
def evaluate(net: nn.Module, data: ImageDataset, batch_size: int, accelerator: Accelerator) -> dict[str, float]:
    """Test metrics over the whole test split, gathered from every process."""
    batches = DeviceBatches(
        data, "test", batch_size, accelerator.device,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    was_training = net.training
    net.eval()
    all_logits, all_labels, all_valid = [], [], []
    with accelerator.autocast():
        for images, labels, valid in batches:
            all_logits.append(net(images).float())
            all_labels.append(labels)
            all_valid.append(valid)
    net.train(was_training)
    logits = accelerator.gather(torch.cat(all_logits))
    labels = accelerator.gather(torch.cat(all_labels))
    valid = accelerator.gather(torch.cat(all_valid))
    metrics = classification_metrics(logits[valid].cpu(), labels[valid].cpu())
    return {f"test_{name}": value for name, value in metrics.items()}


def fit(module: TrainModule, data: ImageDataset, config: FitConfig, accelerator: Accelerator, *, desc: str = "train") -> FitResult:
    """Train `module` on `data`'s training split, then evaluate on its test split."""
    train_batches = DeviceBatches(
        data, "train", config.batch_size, accelerator.device,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=config.seed,
    )
    steps_per_epoch = len(train_batches)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs_to_run = math.ceil(total_steps / steps_per_epoch)

    optimizer = build_optimizer(module, config.lr, config.weight_decay, config.momentum)
    schedule = WarmupCosine(total_steps, warmup_steps=round(config.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The scheduler is stepped by hand once per optimizer step: Accelerate's wrapper would
    # step it once per process, but `total_steps` already counts per-process steps.
    module, optimizer = accelerator.prepare(module, optimizer)
    inner = accelerator.unwrap_model(module)
    timed_step_seconds = 0.0

    images_per_step = config.batch_size * accelerator.num_processes
    progress = tqdm(
        total=total_steps, desc=desc, unit="step", disable=not accelerator.is_main_process, dynamic_ncols=True,
        mininterval=0.2 if sys.stderr.isatty() else 30.0,  # logs get a line every 30 s, not every step
    )
    train_seconds = 0.0
    epoch_losses: list[float] = []
    step = 0
    module.train()
    for epoch in range(epochs_to_run):
        train_batches.set_epoch(epoch)
        progress.set_description(f"{desc} epoch {epoch + 1}/{epochs_to_run}")
        loss_sum = torch.zeros((), device=accelerator.device)
        epoch_steps = 0
        _synchronize(accelerator.device)
        started = time.perf_counter()
        for images, labels, _ in train_batches:
            timed = inner.teacher is not None and step % _TIME_TEACHER_EVERY == 0
            if timed:
                _synchronize(accelerator.device)
                step_started = time.perf_counter()
            inner.time_teacher = timed
            loss, _ = module(images, labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if timed:
                _synchronize(accelerator.device)
                timed_step_seconds += time.perf_counter() - step_started
            loss_sum += loss.detach()
            step += 1
            epoch_steps += 1
            progress.update(1)
            if step % _PROGRESS_EVERY == 0 and accelerator.is_main_process:
                elapsed = train_seconds + time.perf_counter() - started
                progress.set_postfix(loss=f"{loss_sum.item() / epoch_steps:.4f}", img_s=f"{step * images_per_step / elapsed:.0f}", refresh=False)
            if step >= total_steps:
                break
        _synchronize(accelerator.device)
        train_seconds += time.perf_counter() - started
        mean_loss = accelerator.reduce(loss_sum / max(epoch_steps, 1), reduction="mean").item()
        epoch_losses.append(mean_loss)
        progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{step * images_per_step / train_seconds:.0f}")
        if step >= total_steps:
            break
    progress.close()

    inner.time_teacher = False
    metrics = evaluate(inner.net, data, config.batch_size, accelerator) if config.evaluate else {}
    memory_mb, memory_kind = peak_memory(accelerator.device)
    return FitResult(
        metrics=metrics,
        train_seconds=train_seconds,
        images_per_second=step * images_per_step / train_seconds if train_seconds > 0 else 0.0,
        steps=step,
        epochs=len(epoch_losses),
        epoch_train_loss=epoch_losses,
        peak_memory_mb=memory_mb,
        peak_memory_kind=memory_kind,
        teacher_forward_share=inner.teacher_seconds / timed_step_seconds if timed_step_seconds > 0 else None,
    )
