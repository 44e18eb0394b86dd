"""The one training engine, on Accelerate: one CPU, one GPU, many processes, mixed precision.

A stage hands in a network and a method (`kd.methods`); the engine owns the loop, the
optimizer and schedule, progress display, timing, checkpoints and evaluation, and logs the
per-epoch mean of every loss part the method returns.
"""

from __future__ import annotations

import fnmatch
import math
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch._dynamo  # noqa: F401 - see below
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from kd.augment import AugmentOptions
from kd.datasets import ImageDataset
from kd.errors import KDError
from kd.loader import DeviceBatches
from kd.metrics import classification_metrics
from kd.methods.base import EpochContext, Method, StepContext
from kd.rundir import (
    CHECKPOINTS_DIR, SUMMARY_FILE, checkpoint_name, commit_checkpoint, latest_checkpoint, temporary_checkpoint_dir, write_summary,
)


# torch imports torch._dynamo (about 1.5 s) when the first optimizer is built. Importing it with
# the engine keeps that out of the gap between the run directory appearing and the training loop,
# where SIGINT/SIGTERM are not yet turned into a checkpoint and a one-line message.
# Reading the loss forces a device sync, so the bar's loss and img/s refresh every few steps;
# the health check (a non-finite loss; a stop signal under several processes) runs as often.
_PROGRESS_EVERY = 20


class TrainingDiverged(KDError):
    """The loss became NaN or infinite: the run stops instead of finishing with NaN weights."""

    def __init__(self, step: int, loss: float, lr: float, mixed_precision: str, checkpoint: Path | None) -> None:
        advice = f"lower --lr (now {lr:g})" + (" or train in float32 (--mixed-precision no)" if mixed_precision != "no" else "")
        kept = f"; the last complete checkpoint ({checkpoint}) is kept" if checkpoint is not None else ""
        super().__init__(f"training diverged by step {step} (loss {loss}): {advice}{kept}")
        self.step, self.loss = step, loss


class Interrupted(KDError):
    """SIGINT or SIGTERM: the run saved a checkpoint at its current step and stopped."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        name = signal.Signals(signum).name
        if checkpoint is None:
            where = "no checkpoint was written (no run directory)"
        else:
            where = f"checkpoint saved to {checkpoint}; run the same command with --resume to continue"
        super().__init__(f"stopped by {name} at step {step}: {where}")
        self.exit_code = 128 + signum


class TrainModule(nn.Module):
    """The network and its training method (`kd.methods.Method`) in one module.

    `accelerator.prepare` wraps this whole module, so under DDP the method's own parameters
    (the LS++ C logits) have their gradients all-reduced exactly like the network's, and under
    mixed precision the forward runs in autocast (methods compute their loss in float32
    themselves). The method is kept under the attribute name `criterion`, so checkpoints keep
    their parameter names ("criterion.logits").
    """

    def __init__(self, net: nn.Module, method: Method) -> None:
        super().__init__()
        self.net = net
        self.criterion = method

    def forward(self, images: torch.Tensor, targets: torch.Tensor, context: StepContext) -> dict[str, torch.Tensor]:
        context.images = images
        return self.criterion(self.net(images), targets, context)

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
    augment: AugmentOptions | None = None  # None: the dataset's default augmentations
    # Validation (needs `data.val`): every `eval_every` epochs and after the last one; None: every epoch.
    eval_every: int | None = None
    # Convolutional networks in channels-last memory format (NHWC): oneDNN's and cuDNN's faster layout.
    channels_last: bool = True
    compile: bool = False  # torch.compile the network (in place: parameter names stay the same)

    @property
    def checkpointing(self) -> bool:
        return self.run_dir is not None and bool(self.checkpoint_every_epochs or self.checkpoint_every_steps)


@dataclass
class FitResult:
    metrics: dict[str, float]  # test_top1, test_nll, test_ece, test_mean_confidence (and val_* with a validation split)
    train_seconds: float
    images_per_second: float
    steps: int  # optimizer steps
    epochs: int
    epoch_loss_parts: dict[str, list[float]] = field(default_factory=dict)  # per-epoch mean of each loss part
    method_metrics: dict[str, Any] = field(default_factory=dict)  # the method's own (KD: teacher_forward_share)
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""
    grad_accum: int = 1
    effective_batch_size: int = 0  # images per optimizer step over all processes
    resumed_from_step: int | None = None
    summary: list[dict[str, float]] = field(default_factory=list)  # summary.csv's rows, one per epoch

    @property
    def epoch_train_loss(self) -> list[float]:
        return self.epoch_loss_parts.get("loss", [])


class TrainState:
    """What Accelerate's `save_state` does not hold itself: where the run is, and per-process state.

    Registered with `accelerator.register_for_checkpointing`, so it travels in every checkpoint.
    Checkpoints are written by the main process only, which is why `capture` first gathers what
    differs between processes: the augmentation generator's state, the current epoch's partial
    loss sums, and the method's `rank_state()` (OLS's accumulators).
    """

    FORMAT = "kd-train-state/2"

    def __init__(self, batches: DeviceBatches, method: Method, rank: int, world_size: int) -> None:
        self.batches, self.method = batches, method
        self.rank, self.world_size = rank, world_size
        self.step = 0  # optimizer steps done
        self.history: dict[str, list[float]] = {}  # per loss part, completed epochs' means
        self.train_seconds = 0.0
        self.epoch_batches = 0  # micro-batches done in the current epoch
        self.part_sums: list[dict[str, float]] = [{} for _ in range(world_size)]  # per process, current epoch
        self.generator_states: list[torch.Tensor] | None = None  # per process
        self.method_states: list[dict[str, torch.Tensor]] = [{} for _ in range(world_size)]  # per process
        self.summary: list[dict[str, float]] = []  # completed epochs' summary.csv rows
        self.epoch_start_seconds = 0.0  # train_seconds when the current epoch began

    def capture(self, step: int, history: dict[str, list[float]], train_seconds: float, epoch_batches: int,
                part_sums: dict[str, torch.Tensor], summary: list[dict[str, float]], epoch_start_seconds: float) -> None:
        """Record the run's position; a collective call (every process must call it)."""
        mine = [(
            self.batches.generator.get_state().cpu(),
            {name: float(value.item()) for name, value in part_sums.items()},
            {name: value.detach().cpu().clone() for name, value in self.method.rank_state().items()},
        )]
        everyone = gather_object(mine)
        self.step, self.train_seconds, self.epoch_batches = step, train_seconds, epoch_batches
        self.history = {name: list(values) for name, values in history.items()}
        self.summary, self.epoch_start_seconds = [dict(row) for row in summary], epoch_start_seconds
        self.generator_states = [generator for generator, _, _ in everyone]
        self.part_sums = [sums for _, sums, _ in everyone]
        self.method_states = [method_state for _, _, method_state in everyone]

    def state_dict(self) -> dict:
        return {
            "format": self.FORMAT,
            "step": self.step,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "epoch_batches": self.epoch_batches,
            "part_sums": self.part_sums,
            "generator_states": self.generator_states,
            "method_states": self.method_states,
            "world_size": self.world_size,
            "summary": self.summary,
            "epoch_start_seconds": self.epoch_start_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise KDError(
                f"--resume: the checkpoint was written by {state['world_size']} process(es), this run has "
                f"{self.world_size}; resume with the same number of processes"
            )
        if state.get("format") == "kd-train-state/1":  # kd 0.1: one loss, no method state
            state = {
                **state, "history": {"loss": state["epoch_losses"]},
                "part_sums": [{"loss": loss} for loss in state["loss_sums"]],
                "method_states": [{} for _ in range(self.world_size)],
            }
        self.step = int(state["step"])
        self.history = {name: list(values) for name, values in state["history"].items()}
        self.train_seconds = float(state["train_seconds"])
        self.epoch_batches = int(state["epoch_batches"])
        self.part_sums = list(state["part_sums"])
        self.generator_states = state["generator_states"]
        self.method_states = list(state["method_states"])
        self.summary = [dict(row) for row in state.get("summary", [])]  # absent before kd 0.2
        self.epoch_start_seconds = float(state.get("epoch_start_seconds", self.train_seconds))
        self.batches.generator.set_state(self.generator_states[self.rank])
        self.method.load_rank_state(self.method_states[self.rank])


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


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, log_with: list[str] | None = None,
                     logging_dir: str | None = None) -> Accelerator:
    """The Accelerator for a training run, under any launcher (plain python, torchrun, accelerate launch).

    On a machine without a GPU (or other accelerator) it is created with `cpu=True`: only then
    does Accelerate turn torchrun's environment into a multi-process CPU run (gloo backend);
    otherwise every process would train alone, as if it were rank 0 of 1. `log_with` names
    Accelerate trackers; they log under `logging_dir` (set it to the run directory before
    `init_trackers`).
    """
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=not has_accelerator,
        log_with=log_with or None, project_dir=logging_dir if log_with else None,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process's peak RSS on the CPU.

    On Linux the peak RSS is VmHWM: getrusage's ru_maxrss survives exec, so a run started
    from a large process (a benchmark holding torch) would report at least that process's size.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "cpu_peak_rss"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


@torch.no_grad()
def evaluate(net: nn.Module, data: ImageDataset, batch_size: int, accelerator: Accelerator, split: str = "test") -> dict[str, float]:
    """Metrics over the whole `split` ("test" or "val"), gathered from every process; names prefixed with the split."""
    batches = DeviceBatches(
        data, split, batch_size, accelerator.device,
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
    return {f"{split}_{name}": value for name, value in metrics.items()}


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


@dataclass
class _Plan:
    """How many optimizer steps the run takes, and how they fall into epochs."""

    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def first_epoch(self, step: int) -> int:
        return step // self.steps_per_epoch if step < self.total_steps else self.epochs


class _Loop:
    """The training loop of one `fit` call: position, timing, per-epoch loss parts, checkpoints."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 batches: DeviceBatches, state: TrainState, plan: _Plan, config: FitConfig, accelerator: Accelerator, desc: str,
                 data: ImageDataset) -> None:
        self.module, self.optimizer, self.scheduler, self.data = module, optimizer, scheduler, data
        self.batches, self.state, self.plan, self.config, self.accelerator = batches, state, plan, config, accelerator
        self.method: Method = accelerator.unwrap_model(module).criterion
        self.desc = desc
        self.accum = accelerator.gradient_accumulation_steps
        self.effective_batch = config.batch_size * self.accum * accelerator.num_processes
        self.step = self.first_step = state.step
        self.train_seconds = self.seconds_before = state.train_seconds
        self.history = {name: list(values) for name, values in state.history.items()}
        self.summary = [dict(row) for row in state.summary]
        self.epoch_start_seconds = state.epoch_start_seconds
        self.last_lr = 0.0
        self.progress = tqdm(
            total=plan.total_steps, initial=min(self.step, plan.total_steps), desc=desc, unit="step",
            disable=not accelerator.is_main_process, dynamic_ncols=True,
            mininterval=0.2 if sys.stderr.isatty() else 30.0,  # logs get a line every 30 s, not every step
        )
        self._clock = 0.0
        self.stop_signal = 0  # the signal number once SIGINT or SIGTERM asked the run to stop
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # no sync per step
        self.last_loss = torch.zeros((), device=accelerator.device)

    def run(self) -> None:
        self.module.train()
        first = self.plan.first_epoch(self.step)
        if self.first_step:
            self.write_summary()  # drops any rows a killed run wrote after its last checkpoint
        with self._stop_signals():
            for epoch in range(first, self.plan.epochs):
                self._train_epoch(epoch, resumed=epoch == first)
                if self.step >= self.plan.total_steps:
                    break
        self.progress.close()

    @contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM ask the loop to checkpoint and stop; a second one stops at once."""
        self.stop_signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.stop_signal:
                raise KeyboardInterrupt
            self.stop_signal = signum

        previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _health(self) -> int:
        """The stop signal (0 if none), agreed by every process (a device sync); a non-finite loss raises."""
        flags = torch.stack([self.nonfinite.float(), torch.tensor(float(self.stop_signal), device=self.nonfinite.device)])
        if self.accelerator.num_processes > 1:  # one small all-reduce: every process stops at the same step
            flags = self.accelerator.reduce(flags, reduction="max")
        nonfinite, stop_signal = flags.tolist()
        if nonfinite:  # before anything is saved: a checkpoint with NaN weights would be worse than none
            self._diverged(self.last_loss.item())
        return int(stop_signal)

    def _diverged(self, loss: float) -> None:
        self.progress.close()
        latest = latest_checkpoint(self.config.run_dir) if self.config.run_dir else None
        raise TrainingDiverged(self.step, loss, self.config.lr, self.accelerator.mixed_precision, latest)

    def check_weights(self) -> None:
        """Non-finite weights or buffers (an update, or BatchNorm statistics, that overflowed) stop the
        run like a non-finite loss: before a checkpoint is saved, and before the final artifacts."""
        with torch.no_grad():
            tensors = [*self.module.parameters(), *(b for b in self.module.buffers() if b.is_floating_point())]
            finite = torch.stack([t.isfinite().all() for t in tensors]).all()
        if not finite.item():
            self._diverged(float("nan"))

    def _stop(self, signum: int) -> None:
        self.progress.close()
        checkpoint = None
        if self.config.run_dir is not None:
            checkpoint = Path(self.config.run_dir) / CHECKPOINTS_DIR / checkpoint_name(self.step)
        raise Interrupted(signum, self.step, checkpoint)

    # Training time excludes checkpoint writing: the clock pauses around it.
    def _start_clock(self) -> None:
        _synchronize(self.accelerator.device)
        self._clock = time.perf_counter()

    def _stop_clock(self) -> None:
        _synchronize(self.accelerator.device)
        self.train_seconds += time.perf_counter() - self._clock

    def _train_epoch(self, epoch: int, resumed: bool) -> None:
        done = self.step - epoch * self.plan.steps_per_epoch  # > 0 only when resuming mid-epoch
        self.batches.set_epoch(epoch, done * self.accum, self.plan.steps_in(epoch) * self.accum)
        self.progress.set_description(f"{self.desc} epoch {epoch + 1}/{self.plan.epochs}")
        device = self.accelerator.device
        if done == 0:
            self.epoch_start_seconds = self.train_seconds
        if resumed:
            own = self.state.part_sums[self.accelerator.process_index]
            sums = {name: torch.tensor(value, device=device) for name, value in own.items()}
            count = self.state.epoch_batches
        else:
            sums, count = {}, 0
        self._start_clock()
        for images, targets, _ in self.batches:
            parts = self._micro_step(images, targets, epoch)
            self.last_loss = parts["loss"].detach()
            self.nonfinite |= ~torch.isfinite(self.last_loss)
            for name, value in parts.items():
                sums[name] = sums[name] + value.detach() if name in sums else value.detach().clone()
            count += 1
            if not self.accelerator.sync_gradients:
                continue
            self.step += 1
            self.progress.update(1)
            if self.step % _PROGRESS_EVERY == 0 and self.accelerator.is_main_process:
                self._show_progress(sums["loss"].item() / count)
            every = self.config.checkpoint_every_steps
            end_of_epoch = epoch * self.plan.steps_per_epoch + self.plan.steps_in(epoch)
            if self.step >= end_of_epoch:  # `_end_epoch` checks and checkpoints
                continue
            due = self.config.checkpointing and bool(every) and self.step % every == 0
            single_stop = self.accelerator.num_processes == 1 and self.stop_signal
            if due or single_stop or self.step % _PROGRESS_EVERY == 0:
                self._stop_clock()
                stop_signal = self._health()
                if due or (stop_signal and self.config.run_dir is not None):
                    self._checkpoint(count, sums)
                if stop_signal:
                    self._stop(stop_signal)
                self._start_clock()
        self._stop_clock()
        self._end_epoch(epoch, sums, count)

    def _micro_step(self, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        context = StepContext(epoch=epoch, step=self.step, total_steps=self.plan.total_steps, steps_per_epoch=self.plan.steps_per_epoch)
        with self.accelerator.accumulate(self.module):
            parts = self.module(images, targets, context)
            self.accelerator.backward(parts["loss"])  # divides by the accumulation steps
            if self.accelerator.sync_gradients:
                self.last_lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return parts

    def _show_progress(self, loss: float) -> None:
        seconds = self.train_seconds + time.perf_counter() - self._clock - self.seconds_before
        images = (self.step - self.first_step) * self.effective_batch
        self.progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{images / max(seconds, 1e-9):.0f}", refresh=False)

    def _end_epoch(self, epoch: int, sums: dict[str, torch.Tensor], count: int) -> None:
        names = list(sums)
        means = self.accelerator.reduce(torch.stack([sums[name] / max(count, 1) for name in names]), reduction="mean")
        for name, mean in zip(names, means.tolist()):
            self.history.setdefault(name, []).append(mean)
        self.progress.set_postfix(loss=f"{self.history['loss'][-1]:.4f}")
        stop_signal = self._health()
        self.method.on_epoch_end(EpochContext(
            epoch=epoch, step=self.step, total_steps=self.plan.total_steps,
            all_reduce_sum=lambda tensor: self.accelerator.reduce(tensor, reduction="sum"),
        ))
        self._record_epoch(epoch)
        every_epochs, every_steps = self.config.checkpoint_every_epochs, self.config.checkpoint_every_steps
        if stop_signal and self.config.run_dir is not None or self.config.checkpointing and (
            self.step >= self.plan.total_steps
            or (every_epochs and (epoch + 1) % every_epochs == 0)
            or (every_steps and self.step % every_steps == 0)
        ):
            self._checkpoint(0, {})
        if stop_signal and self.step < self.plan.total_steps:
            self._stop(stop_signal)

    def _checkpoint(self, epoch_batches: int, sums: dict[str, torch.Tensor]) -> None:
        self.check_weights()
        self.state.capture(self.step, self.history, self.train_seconds, epoch_batches, sums, self.summary, self.epoch_start_seconds)
        _save_checkpoint(self.accelerator, self.config.run_dir, self.step)

    def _validate_now(self, epoch: int) -> bool:
        if self.data.val is None or not self.config.evaluate:
            return False
        every = self.config.eval_every or 1
        return (epoch + 1) % every == 0 or self.step >= self.plan.total_steps

    def _record_epoch(self, epoch: int) -> None:
        """The epoch's summary.csv row (validated when due), written at once and logged to the trackers."""
        seconds = self.train_seconds - self.epoch_start_seconds
        images = (self.step - epoch * self.plan.steps_per_epoch) * self.effective_batch
        row = {
            "epoch": epoch + 1, "step": self.step, "lr": self.last_lr,
            "images_per_second": images / seconds if seconds > 0 else 0.0, "train_seconds": self.train_seconds,
            **{f"train_{name}": values[-1] for name, values in self.history.items()},
        }
        if self._validate_now(epoch):
            inner = self.accelerator.unwrap_model(self.module)
            sync_buffers(inner, self.accelerator)
            row.update(evaluate(inner.net, self.data, self.config.batch_size, self.accelerator, "val"))
            inner.train()
        self.summary.append(row)
        self.write_summary()
        self.accelerator.log({key: value for key, value in row.items() if key != "epoch"}, step=row["epoch"])

    def write_summary(self) -> None:
        """Rewrite summary.csv from the rows so far (main process; a run with a directory only)."""
        if self.config.run_dir is not None and self.accelerator.is_main_process:
            write_summary(Path(self.config.run_dir) / SUMMARY_FILE, self.summary)

    def add_final_metrics(self, metrics: dict[str, float]) -> None:
        """The test metrics (and the last validation) join the last epoch's row."""
        if self.summary and metrics:
            self.summary[-1].update(metrics)
            self.write_summary()
            self.accelerator.log(metrics, step=self.summary[-1]["epoch"])

    def result(self, metrics: dict[str, float]) -> FitResult:
        memory_mb, memory_kind = peak_memory(self.accelerator.device)
        return FitResult(
            metrics=metrics,
            train_seconds=self.train_seconds,
            images_per_second=self.step * self.effective_batch / self.train_seconds if self.train_seconds > 0 else 0.0,
            steps=self.step,
            epochs=len(self.history.get("loss", [])),
            epoch_loss_parts=self.history,
            method_metrics=self.method.train_metrics(self.train_seconds - self.seconds_before),
            peak_memory_mb=memory_mb,
            peak_memory_kind=memory_kind,
            grad_accum=self.accum,
            effective_batch_size=self.effective_batch,
            resumed_from_step=self.first_step if self.config.resume_from else None,
            summary=self.summary,
        )


def fit(module: TrainModule, data: ImageDataset, config: FitConfig, accelerator: Accelerator, *, desc: str = "train") -> FitResult:
    """Train `module` on `data`'s training split, then evaluate on its test split.

    Gradient accumulation comes from the accelerator (`gradient_accumulation_steps`): an
    optimizer step then covers that many micro-batches of `config.batch_size` per process, and
    the schedule, `max_steps` and checkpoint steps count optimizer steps. Each epoch uses a
    whole number of optimizer steps (left-over micro-batches are dropped, like the last
    incomplete batch), so accumulation never straddles an epoch boundary.
    """
    batches = DeviceBatches(
        data, "train", config.batch_size, accelerator.device,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=config.seed, augment=config.augment,
    )
    steps_per_epoch = optimizer_steps_per_epoch(
        batches.num_samples, config.batch_size, accelerator.num_processes, accelerator.gradient_accumulation_steps,
    )
    total_steps = steps_per_epoch * config.epochs
    plan = _Plan(steps_per_epoch, total_steps if config.max_steps is None else min(total_steps, config.max_steps))

    if config.channels_last and any(isinstance(part, nn.Conv2d) for part in module.net.modules()):
        module.net.to(memory_format=torch.channels_last)
    if config.compile:
        module.net.compile()
    optimizer = build_optimizer(module, config.lr, config.weight_decay, config.momentum)
    schedule = WarmupCosine(plan.total_steps, warmup_steps=round(config.warmup_fraction * plan.total_steps))
    # Stepped by hand once per optimizer step: Accelerate's wrapper would step it once per
    # process, but `total_steps` already counts per-process steps.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    module, optimizer = accelerator.prepare(module, optimizer)
    inner = accelerator.unwrap_model(module)
    state = TrainState(batches, inner.criterion, accelerator.process_index, accelerator.num_processes)
    if config.run_dir is not None or config.resume_from:  # any run with a directory may checkpoint (a stop signal)
        accelerator.register_for_checkpointing(scheduler, state)
    if config.resume_from:
        # Model (network + method parameters and buffers), optimizer, scheduler, python/numpy/torch RNG, and `state`.
        accelerator.load_state(str(config.resume_from))

    if config.eval_every is not None and data.val is None:
        raise KDError("eval_every needs a validation split (--val-split)")
    loop = _Loop(module, optimizer, scheduler, batches, state, plan, config, accelerator, desc, data)
    loop.run()
    loop.check_weights()
    sync_buffers(inner, accelerator)
    metrics = evaluate(inner.net, data, config.batch_size, accelerator) if config.evaluate else {}
    if loop.summary and any(key.startswith("val_") for key in loop.summary[-1]):
        metrics = {**{key: value for key, value in loop.summary[-1].items() if key.startswith("val_")}, **metrics}
    loop.add_final_metrics({key: value for key, value in metrics.items() if key.startswith("test_")})
    return loop.result(metrics)
