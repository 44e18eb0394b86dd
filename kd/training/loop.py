"""The training loop on Accelerate: one CPU, one GPU, many processes, mixed precision.

A stage hands in a network and a method (`kd.methods`) as one `TrainModule`; `fit` runs the
loop, the progress bar, timing, summary.csv, checkpoints and evaluation, and logs the
per-epoch mean of every loss part the method returns. Beside it: the optimizer and schedule
(`optim`), the checkpointed state (`state`), stop signals and divergence (`guards`), and
predictions and metrics (`evaluate`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch._dynamo  # noqa: F401 - see below
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from tqdm.auto import tqdm

from kd.data.augment import AugmentOptions
from kd.data.datasets import ImageDataset
from kd.data.loader import DeviceBatches
from kd.device import peak_memory, reset_peak_memory, synchronize, use_fast_kernels
from kd.errors import KDError
from kd.methods.base import EpochContext, Method, StepContext
from kd.training.evaluate import evaluate as split_metrics, sync_buffers
from kd.training.guards import Guard, Interrupted, TrainingDiverged
from kd.training.optim import WARMUP_FRACTION, HeadOnlyEpochs, Plan, build_optimizer, build_scheduler, optimizer_steps_per_epoch
from kd.training.rundir import SUMMARY_FILE, write_summary
from kd.training.state import TrainState, check_room_for_checkpoints

if TYPE_CHECKING:
    from kd.training.settings import Settings

__all__ = ["FitResult", "Interrupted", "TrainModule", "TrainingDiverged", "fit", "make_accelerator"]

# torch imports torch._dynamo (about 1.5 s) when the first optimizer is built. Importing it with
# the loop keeps that out of the gap between the run directory appearing and the training loop,
# where SIGINT/SIGTERM are not yet turned into a checkpoint and a one-line message.
# Reading the loss forces a device sync, so the bar's loss and img/s refresh every few steps;
# the health check (a non-finite loss; a stop signal under several processes) runs as often.
_PROGRESS_EVERY = 20


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


def make_accelerator(mixed_precision: str | None = "no", grad_accum: int = 1, log_with: list[str] | None = None,
                     logging_dir: str | None = None) -> Accelerator:
    """The Accelerator for a training run, under any launcher (plain python, torchrun, accelerate launch).

    On a machine without a GPU (or other accelerator) it is created with `cpu=True`: only then
    does Accelerate turn torchrun's environment into a multi-process CPU run (gloo backend);
    otherwise every process would train alone, as if it were rank 0 of 1. `mixed_precision`
    None takes `accelerate launch --mixed_precision` (its environment), else "no".

    DDP would copy every buffer from rank 0 at each forward (`broadcast_buffers`): that would
    overwrite state each process keeps for itself until an epoch end sums it (OLS's statistics)
    and re-send frozen ones every step (a proxy's C-matrix, a KD teacher's BatchNorm statistics).
    BatchNorm's running statistics, the only buffers that differ by rank otherwise, are the main
    process's wherever they are used (`sync_buffers` before evaluating and saving); in training
    mode BatchNorm normalises with the batch's own statistics. `log_with` names
    Accelerate trackers; they log under `logging_dir` (set it to the run directory before
    `init_trackers`).
    """
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=not has_accelerator,
        log_with=log_with or None, project_dir=logging_dir if log_with else None,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def fit(module: TrainModule, data: ImageDataset, settings: Settings, accelerator: Accelerator, *,
        run_dir: str | Path | None = None, resume_from: str | Path | None = None, augment: AugmentOptions | None = None,
        evaluate: bool = True, warmup_fraction: float = WARMUP_FRACTION, desc: str = "train") -> FitResult:
    """Train `module` on `data`'s training split, then (`evaluate`) measure it on the test split.

    `settings` (`kd.training.settings.Settings`) gives epochs, batch_size (per process and
    micro-batch), lr, weight_decay, seed, max_steps, checkpoint_every (epochs),
    checkpoint_every_steps, eval_every (epochs; needs `data.val`), channels_last, compile and num_workers.
    `run_dir` gets summary.csv and checkpoints; `resume_from` is a checkpoint to continue from.
    An optimizer step covers the accelerator's `gradient_accumulation_steps` micro-batches per
    process; the schedule, `max_steps` and checkpoint steps count optimizer steps, and each
    epoch is a whole number of them (left-over micro-batches are dropped).
    """
    if settings.eval_every is not None and data.val is None:
        raise KDError("eval_every needs a validation split (--val-split)")
    probe = HeadOnlyEpochs(module.net, data.num_classes, settings.head_only_epochs or 0)
    module, optimizer, scheduler, batches, plan, state = _prepare(
        module, data, settings, accelerator, run_dir, resume_from, augment, warmup_fraction,
    )
    method: Method = accelerator.unwrap_model(module).criterion
    checkpointing = run_dir is not None and bool(settings.checkpoint_every or settings.checkpoint_every_steps)
    if checkpointing:  # every process: they all stop, not just the main one
        check_room_for_checkpoints(run_dir, module)
    every_epochs, every_steps = settings.checkpoint_every, settings.checkpoint_every_steps
    accum = accelerator.gradient_accumulation_steps
    effective_batch = settings.batch_size * accum * accelerator.num_processes
    first_step, seconds_before, last_lr = state.step, state.train_seconds, 0.0
    progress = _progress_bar(plan, state.step, desc, accelerator)
    guard, clock = Guard(accelerator, settings.lr, run_dir, progress), _Clock(accelerator.device)
    module.train()
    if first_step:
        _write_summary(accelerator, run_dir, state.summary)  # drops any rows a killed run wrote after its last checkpoint
    first_epoch = plan.first_epoch(state.step)
    # closing: streamed data's DataLoader workers stop; the bar ends its line, so an error is a line of its own
    with guard.stop_signals(), contextlib.closing(batches), contextlib.closing(progress):
        for epoch in range(first_epoch, plan.epochs):
            done = state.step - epoch * plan.steps_per_epoch  # > 0 only when resuming mid-epoch
            batches.set_epoch(epoch, done * accum, plan.steps_in(epoch) * accum)
            progress.set_description(f"{desc} epoch {epoch + 1}/{plan.epochs}")
            probe.start_epoch(epoch)
            if done == 0:
                state.epoch_start_seconds = state.train_seconds
            # This process's per-part loss sums over the epoch's micro-batches (a resumed epoch continues its own).
            sums, count = (state.own_part_sums(accelerator.device), state.epoch_batches) if epoch == first_epoch else ({}, 0)
            clock.start()  # training time leaves out checkpoints and validation
            for images, targets, _, indices in batches:
                context = StepContext(epoch=epoch, step=state.step, total_steps=plan.total_steps,
                                      steps_per_epoch=plan.steps_per_epoch, indices=indices)
                with accelerator.accumulate(module):
                    parts = module(images, targets, context)
                    accelerator.backward(parts["loss"])  # divides by the accumulation steps
                    if accelerator.sync_gradients:
                        last_lr = optimizer.param_groups[-1]["lr"]  # the full rate (with --layer-decay, the head's)
                        probe.before_step(epoch)
                        optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:  # fp16: the scaler skipped an overflowed step
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                guard.watch(parts["loss"])
                for name, value in parts.items():
                    sums[name] = sums[name] + value.detach() if name in sums else value.detach().clone()
                count += 1
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                progress.update(1)
                if state.step % _PROGRESS_EVERY == 0 and accelerator.is_main_process:
                    seconds = state.train_seconds + clock.running() - seconds_before
                    images_per_second = (state.step - first_step) * effective_batch / max(seconds, 1e-9)
                    progress.set_postfix(loss=f"{sums['loss'].item() / count:.4f}", img_s=f"{images_per_second:.0f}", refresh=False)
                if state.step >= plan.end_of(epoch):  # the end of the epoch checks and checkpoints
                    continue
                due = checkpointing and _every(every_steps, state.step)
                if due or (accelerator.num_processes == 1 and guard.signum) or state.step % _PROGRESS_EVERY == 0:
                    state.train_seconds += clock.stop()
                    signum = guard.health(state.step)
                    if due or (signum and run_dir is not None):
                        guard.check_weights(module, state.step)
                        state.save(accelerator, run_dir, count, sums)
                    if signum:
                        guard.stop(signum, state.step)
                    clock.start()
            state.train_seconds += clock.stop()

            # End of the epoch: loss parts averaged over every process, the method's hook, the summary row.
            means = accelerator.reduce(torch.stack([sums[name] / max(count, 1) for name in sums]), reduction="mean")
            for name, mean in zip(sums, means.tolist()):
                state.history.setdefault(name, []).append(mean)
            progress.set_postfix(loss=f"{state.history['loss'][-1]:.4f}")
            signum = guard.health(state.step)
            method.on_epoch_end(EpochContext(epoch=epoch, step=state.step, total_steps=plan.total_steps,
                                             all_reduce_sum=lambda tensor: accelerator.reduce(tensor, reduction="sum")))
            last = state.step >= plan.total_steps
            row = _epoch_row(state, epoch, plan, effective_batch, last_lr)
            if evaluate and data.val is not None and (last or _every(settings.eval_every or 1, epoch + 1)):
                row.update(_validate(module, data, settings, accelerator))  # every eval_every epochs, and last
            _add_row(accelerator, run_dir, state, row)
            if signum and run_dir is not None or checkpointing and (last or _every(every_epochs, epoch + 1) or _every(every_steps, state.step)):
                guard.check_weights(module, state.step)
                state.save(accelerator, run_dir, 0, {})
            if signum and not last:
                guard.stop(signum, state.step)
            if last:
                break
    metrics = _test_metrics(module, data, settings, accelerator, guard, state, evaluate)
    _add_test_metrics(accelerator, run_dir, state, metrics)
    return _result(accelerator, state, metrics, effective_batch, method.train_metrics(state.train_seconds - seconds_before),
                   resumed_from_step=first_step if resume_from else None)


def _prepare(module: TrainModule, data: ImageDataset, settings: Settings, accelerator: Accelerator, run_dir: str | Path | None,
             resume_from: str | Path | None, augment: AugmentOptions | None, warmup_fraction: float,
             ) -> tuple[nn.Module, Any, Any, DeviceBatches, Plan, TrainState]:
    """The module, optimizer and schedule as Accelerate prepared them, the training batches, the step plan, and
    the state (registered for checkpoints with a run directory, loaded from `resume_from`)."""
    batches = DeviceBatches(
        data, "train", settings.batch_size, accelerator.device,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=settings.seed, augment=augment,
        num_workers=settings.num_workers,
    )
    steps_per_epoch = optimizer_steps_per_epoch(
        batches.num_samples, settings.batch_size, accelerator.num_processes, accelerator.gradient_accumulation_steps,
    )
    plan = Plan.make(steps_per_epoch, settings.epochs, settings.max_steps)
    use_fast_kernels(accelerator.device)
    reset_peak_memory(accelerator.device)
    # Convolutional networks in channels-last memory format (NHWC): oneDNN's and cuDNN's faster layout;
    # a KD teacher too, so it does not convert every batch back.
    if settings.channels_last:
        for network in (module.net, getattr(module.criterion, "teacher", None)):
            if network is not None and any(isinstance(part, nn.Conv2d) for part in network.modules()):
                network.to(memory_format=torch.channels_last)
    if settings.compile:
        module.net.compile()  # in place: parameter names stay the same
    optimizer = build_optimizer(module, settings.lr, settings.weight_decay, layer_decay=settings.layer_decay,
                                num_classes=data.num_classes)
    scheduler = build_scheduler(optimizer, plan.total_steps, warmup_fraction)
    module, optimizer = accelerator.prepare(module, optimizer)
    state = TrainState(batches, accelerator.unwrap_model(module).criterion, accelerator.process_index, accelerator.num_processes)
    if run_dir is not None or resume_from:  # any run with a directory may checkpoint (a stop signal)
        accelerator.register_for_checkpointing(scheduler, state)
    if resume_from:  # model (network + method parameters and buffers), optimizer, schedule, RNGs, and `state`
        accelerator.load_state(str(resume_from))
    return module, optimizer, scheduler, batches, plan, state


def _progress_bar(plan: Plan, step: int, desc: str, accelerator: Accelerator) -> tqdm:
    return tqdm(
        total=plan.total_steps, initial=min(step, plan.total_steps), desc=desc, unit="step",
        disable=not accelerator.is_main_process, dynamic_ncols=True,
        mininterval=0.2 if sys.stderr.isatty() else 30.0,  # logs get a line every 30 s, not every step
    )


def _every(period: int | None, count: int) -> bool:
    """Whether `count` (steps, epochs) is a multiple of `period`; never without a period."""
    return bool(period) and count % period == 0


class _Clock:
    """Training seconds on the device: each start and stop first waits for the queued work."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.started = device, 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def running(self) -> float:
        """Seconds since `start`, without waiting for the device."""
        return time.perf_counter() - self.started

    def stop(self) -> float:
        """Seconds since `start`."""
        synchronize(self.device)
        return time.perf_counter() - self.started


def _epoch_row(state: TrainState, epoch: int, plan: Plan, effective_batch: int, lr: float) -> dict[str, float]:
    """The epoch's summary.csv row (validation metrics join it when due)."""
    seconds = state.train_seconds - state.epoch_start_seconds
    images = (state.step - epoch * plan.steps_per_epoch) * effective_batch
    return {
        "epoch": epoch + 1, "step": state.step, "lr": lr,
        "images_per_second": images / seconds if seconds > 0 else 0.0, "train_seconds": state.train_seconds,
        **{f"train_{name}": values[-1] for name, values in state.history.items()},
    }


def _validate(module: nn.Module, data: ImageDataset, settings: Settings, accelerator: Accelerator) -> dict[str, float]:
    """The validation split's metrics, with every process's BatchNorm statistics the main process's."""
    inner = accelerator.unwrap_model(module)
    sync_buffers(inner, accelerator)
    metrics = split_metrics(inner.net, data, settings.batch_size, accelerator, "val", settings.num_workers)
    inner.train()
    return metrics


def _add_row(accelerator: Accelerator, run_dir: str | Path | None, state: TrainState, row: dict[str, float]) -> None:
    """A new summary.csv row: written at once and logged to the trackers."""
    state.summary.append(row)
    _write_summary(accelerator, run_dir, state.summary)
    accelerator.log({key: value for key, value in row.items() if key != "epoch"}, step=row["epoch"])


def _write_summary(accelerator: Accelerator, run_dir: str | Path | None, rows: list[dict[str, float]]) -> None:
    """Rewrite summary.csv from the rows so far (main process; a run with a directory only)."""
    if run_dir is not None and accelerator.is_main_process:
        write_summary(Path(run_dir) / SUMMARY_FILE, rows)


def _test_metrics(module: nn.Module, data: ImageDataset, settings: Settings, accelerator: Accelerator, guard: Guard,
                  state: TrainState, evaluate: bool) -> dict[str, float]:
    """After the last step: the weights checked, the test metrics (`evaluate`) and the last validation's."""
    guard.check_weights(module, state.step)
    inner = accelerator.unwrap_model(module)
    sync_buffers(inner, accelerator)
    metrics = split_metrics(inner.net, data, settings.batch_size, accelerator, "test", settings.num_workers) if evaluate else {}
    if state.summary and any(key.startswith("val_") for key in state.summary[-1]):
        metrics = {**{key: value for key, value in state.summary[-1].items() if key.startswith("val_")}, **metrics}
    return metrics


def _add_test_metrics(accelerator: Accelerator, run_dir: str | Path | None, state: TrainState, metrics: dict[str, float]) -> None:
    """The test metrics join the last epoch's summary.csv row."""
    test = {key: value for key, value in metrics.items() if key.startswith("test_")}
    if state.summary and test:
        state.summary[-1].update(test)
        _write_summary(accelerator, run_dir, state.summary)
        accelerator.log(test, step=state.summary[-1]["epoch"])


def _result(accelerator: Accelerator, state: TrainState, metrics: dict[str, float], effective_batch: int,
            method_metrics: dict[str, Any], resumed_from_step: int | None) -> FitResult:
    memory_mb, memory_kind = peak_memory(accelerator.device)
    return FitResult(
        metrics=metrics,
        train_seconds=state.train_seconds,
        images_per_second=state.step * effective_batch / state.train_seconds if state.train_seconds > 0 else 0.0,
        steps=state.step,
        epochs=len(state.history.get("loss", [])),
        epoch_loss_parts=state.history,
        method_metrics=method_metrics,
        peak_memory_mb=memory_mb,
        peak_memory_kind=memory_kind,
        grad_accum=accelerator.gradient_accumulation_steps,
        effective_batch_size=effective_batch,
        resumed_from_step=resumed_from_step,
        summary=state.summary,
    )
