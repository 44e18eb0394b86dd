"""The one training engine, on Accelerate: one CPU, one GPU, many processes, mixed precision.

A stage hands in a network and a criterion; the engine owns the loop, the optimizer and
schedule, progress display, timing and evaluation. Stages differ only in where targets come
from and which loss they use (the criterion).
"""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from timm.optim import param_groups_weight_decay
from torch import nn
from tqdm.auto import tqdm

from kd.datasets import ImageDataset
from kd.errors import KDError
from kd.loader import DeviceBatches
from kd.metrics import classification_metrics
from kd.rundir import checkpoint_name, commit_checkpoint, temporary_checkpoint_dir


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
    batch_size: int  # per process and per micro-batch (see the accelerator's gradient_accumulation_steps)
    lr: float
    weight_decay: float
    seed: int = 0
    max_steps: int | None = None  # optimizer steps
    momentum: float = 0.9
    warmup_fraction: float = 0.03
    evaluate: bool = True  # benchmarks that only time training steps skip the test pass
    # Checkpointing: full training state under `run_dir/checkpoints/step-NNNNNNNN/`.
    run_dir: str | None = None
    checkpoint_every_epochs: int | None = None
    checkpoint_every_steps: int | None = None  # optimizer steps
    resume_from: str | None = None  # a checkpoint directory to continue from


@dataclass
class FitResult:
    metrics: dict[str, float]  # test_top1, test_nll, test_ece, test_mean_confidence
    train_seconds: float
    images_per_second: float
    steps: int  # optimizer steps
    epochs: int
    epoch_train_loss: list[float] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""
    teacher_forward_share: float | None = None  # classic KD: share of step time in the teacher's forward
    grad_accum: int = 1
    effective_batch_size: int = 0  # images per optimizer step over all processes
    resumed_from_step: int | None = None


class TrainState:
    """What Accelerate's `save_state` does not hold itself: where the run is, and the loader's RNG.

    Registered with `accelerator.register_for_checkpointing`, so it travels in every checkpoint
    (written by the main process only, which is why `capture` gathers every process's
    augmentation-generator state and partial loss first).
    """

    def __init__(self, batches: DeviceBatches, rank: int, world_size: int) -> None:
        self.batches = batches
        self.rank, self.world_size = rank, world_size
        self.step = 0  # optimizer steps done
        self.epoch_losses: list[float] = []  # completed epochs' mean train loss
        self.train_seconds = 0.0
        self.epoch_batches = 0  # micro-batches done in the current epoch
        self.loss_sums: list[float] = [0.0] * world_size  # per process, current epoch
        self.generator_states: list[torch.Tensor] | None = None  # per process

    def capture(self, step: int, epoch_losses: list[float], train_seconds: float, epoch_batches: int, loss_sum: torch.Tensor) -> None:
        """Record the run's position; a collective call (every process must call it)."""
        mine = [(self.batches.generator.get_state().cpu(), float(loss_sum.item()))]
        everyone = gather_object(mine)
        self.step, self.epoch_losses, self.train_seconds, self.epoch_batches = step, list(epoch_losses), train_seconds, epoch_batches
        self.generator_states = [state for state, _ in everyone]
        self.loss_sums = [loss for _, loss in everyone]

    def state_dict(self) -> dict:
        return {
            "format": "kd-train-state/1",
            "step": self.step,
            "epoch_losses": self.epoch_losses,
            "train_seconds": self.train_seconds,
            "epoch_batches": self.epoch_batches,
            "loss_sums": self.loss_sums,
            "generator_states": self.generator_states,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise KDError(
                f"--resume: the checkpoint was written by {state['world_size']} process(es), this run has "
                f"{self.world_size}; resume with the same number of processes"
            )
        self.step = int(state["step"])
        self.epoch_losses = list(state["epoch_losses"])
        self.train_seconds = float(state["train_seconds"])
        self.epoch_batches = int(state["epoch_batches"])
        self.loss_sums = list(state["loss_sums"])
        self.generator_states = state["generator_states"]
        self.batches.generator.set_state(self.generator_states[self.rank])


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


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1) -> Accelerator:
    """The Accelerator for a training run, under any launcher (plain python, torchrun, accelerate launch).

    On a machine without a GPU (or other accelerator) it is created with `cpu=True`: only then
    does Accelerate turn torchrun's environment into a multi-process CPU run (gloo backend);
    otherwise every process would train alone, as if it were rank 0 of 1.
    """
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=not has_accelerator)


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


@torch.no_grad()
def sync_buffers(module: nn.Module, accelerator: Accelerator) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics).

    DDP broadcasts them from rank 0 at the start of each forward, but the last forward then
    updates every rank's copy from its own shard; without this, each rank would evaluate (and
    rank 0 would save) a slightly different network.
    """
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def optimizer_steps_per_epoch(num_samples: int, batch_size: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch (whole accumulation groups of whole batches); a `KDError` if none fit."""
    batches = max(math.ceil(num_samples / world_size) // batch_size, 1)
    if batches < grad_accum:
        raise KDError(
            f"--grad-accum {grad_accum} needs at least {grad_accum} batches per epoch and process, but there "
            f"are {batches} (--batch-size {batch_size}, {world_size} process(es)): lower --grad-accum or --batch-size"
        )
    return batches // grad_accum


def _save_checkpoint(accelerator: Accelerator, run_dir: str, step: int) -> Path:
    """`save_state` into a temporary directory on every process; the main process then renames it."""
    tmp = temporary_checkpoint_dir(run_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # an unfinished save of the same step by a killed run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    final = commit_checkpoint(tmp, step) if accelerator.is_main_process else tmp.parent / checkpoint_name(step)
    accelerator.wait_for_everyone()
    return final


def fit(module: TrainModule, data: ImageDataset, config: FitConfig, accelerator: Accelerator, *, desc: str = "train") -> FitResult:
    """Train `module` on `data`'s training split, then evaluate on its test split.

    Gradient accumulation comes from the accelerator (`gradient_accumulation_steps`): an
    optimizer step then covers that many micro-batches of `config.batch_size` per process, and
    the schedule, `max_steps` and checkpoint steps count optimizer steps. Each epoch uses a
    whole number of optimizer steps (left-over micro-batches are dropped, like the last
    incomplete batch), so accumulation never straddles an epoch boundary.
    """
    accum = accelerator.gradient_accumulation_steps
    train_batches = DeviceBatches(
        data, "train", config.batch_size, accelerator.device,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=config.seed,
    )
    steps_per_epoch = optimizer_steps_per_epoch(train_batches.num_samples, config.batch_size, accelerator.num_processes, accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs_to_run = math.ceil(total_steps / steps_per_epoch)
    every_epochs, every_steps = config.checkpoint_every_epochs, config.checkpoint_every_steps
    checkpointing = config.run_dir is not None and bool(every_epochs or every_steps)

    optimizer = build_optimizer(module, config.lr, config.weight_decay, config.momentum)
    schedule = WarmupCosine(total_steps, warmup_steps=round(config.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The scheduler is stepped by hand once per optimizer step: Accelerate's wrapper would
    # step it once per process, but `total_steps` already counts per-process steps.
    module, optimizer = accelerator.prepare(module, optimizer)
    inner = accelerator.unwrap_model(module)
    state = TrainState(train_batches, accelerator.process_index, accelerator.num_processes)
    if checkpointing or config.resume_from:
        accelerator.register_for_checkpointing(scheduler, state)
    resumed_from = None
    if config.resume_from:
        # Model (network + C logits), optimizer, scheduler, python/numpy/torch RNG, and `state`.
        accelerator.load_state(str(config.resume_from))
        resumed_from = state.step
    timed_step_seconds = 0.0

    effective_batch = config.batch_size * accum * accelerator.num_processes
    progress = tqdm(
        total=total_steps, initial=min(state.step, total_steps), desc=desc, unit="step",
        disable=not accelerator.is_main_process, dynamic_ncols=True,
        mininterval=0.2 if sys.stderr.isatty() else 30.0,  # logs get a line every 30 s, not every step
    )
    train_seconds = state.train_seconds
    epoch_losses: list[float] = list(state.epoch_losses)
    step = state.step
    first_step = step
    micro = 0
    module.train()
    start_epoch = step // steps_per_epoch if step < total_steps else epochs_to_run
    for epoch in range(start_epoch, epochs_to_run):
        done_in_epoch = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
        epoch_end = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        train_batches.set_epoch(epoch, done_in_epoch * accum, epoch_end * accum)
        progress.set_description(f"{desc} epoch {epoch + 1}/{epochs_to_run}")
        if epoch == start_epoch:
            loss_sum = torch.tensor(state.loss_sums[accelerator.process_index], device=accelerator.device)
            epoch_batches = state.epoch_batches
        else:
            loss_sum = torch.zeros((), device=accelerator.device)
            epoch_batches = 0
        _synchronize(accelerator.device)
        started = time.perf_counter()
        for images, labels, _ in train_batches:
            timed = inner.teacher is not None and micro % _TIME_TEACHER_EVERY == 0
            if timed:
                _synchronize(accelerator.device)
                step_started = time.perf_counter()
            inner.time_teacher = timed
            with accelerator.accumulate(module):
                loss, _ = module(images, labels)
                accelerator.backward(loss)  # divides by the accumulation steps
                if accelerator.sync_gradients:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if timed:
                _synchronize(accelerator.device)
                timed_step_seconds += time.perf_counter() - step_started
            loss_sum += loss.detach()
            micro += 1
            epoch_batches += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % _PROGRESS_EVERY == 0 and accelerator.is_main_process:
                elapsed = train_seconds + time.perf_counter() - started
                progress.set_postfix(loss=f"{loss_sum.item() / epoch_batches:.4f}", img_s=f"{(step - first_step) * effective_batch / max(elapsed - state.train_seconds, 1e-9):.0f}", refresh=False)
            if checkpointing and every_steps and step % every_steps == 0 and step < epoch * steps_per_epoch + epoch_end:
                _synchronize(accelerator.device)
                train_seconds += time.perf_counter() - started
                state.capture(step, epoch_losses, train_seconds, epoch_batches, loss_sum)
                _save_checkpoint(accelerator, config.run_dir, step)
                started = time.perf_counter()
        _synchronize(accelerator.device)
        train_seconds += time.perf_counter() - started
        mean_loss = accelerator.reduce(loss_sum / max(epoch_batches, 1), reduction="mean").item()
        epoch_losses.append(mean_loss)
        progress.set_postfix(loss=f"{mean_loss:.4f}")
        finished = step >= total_steps
        if checkpointing and (
            finished
            or (every_epochs and (epoch + 1) % every_epochs == 0)
            or (every_steps and step % every_steps == 0)
        ):
            state.capture(step, epoch_losses, train_seconds, 0, torch.zeros((), device=accelerator.device))
            _save_checkpoint(accelerator, config.run_dir, step)
        if finished:
            break
    progress.close()

    inner.time_teacher = False
    sync_buffers(inner, accelerator)
    metrics = evaluate(inner.net, data, config.batch_size, accelerator) if config.evaluate else {}
    memory_mb, memory_kind = peak_memory(accelerator.device)
    return FitResult(
        metrics=metrics,
        train_seconds=train_seconds,
        images_per_second=step * effective_batch / train_seconds if train_seconds > 0 else 0.0,
        steps=step,
        epochs=len(epoch_losses),
        epoch_train_loss=epoch_losses,
        peak_memory_mb=memory_mb,
        peak_memory_kind=memory_kind,
        teacher_forward_share=inner.teacher_seconds / timed_step_seconds if timed_step_seconds > 0 else None,
        grad_accum=accum,
        effective_batch_size=effective_batch,
        resumed_from_step=resumed_from,
    )
