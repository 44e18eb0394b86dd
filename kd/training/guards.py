"""What stops a run early, and how: a stop signal, a diverged loss, non-finite weights.

SIGINT and SIGTERM ask the loop to checkpoint and stop (a second one stops at once); a NaN or
infinite loss, or non-finite weights, raise `TrainingDiverged` before anything is saved. The
loss is checked on the device without a sync each step, and the flags are read (and, under
several processes, agreed on: every process stops at the same step) every few steps.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from kd.errors import KDError
from kd.training.rundir import CHECKPOINTS_DIR, checkpoint_name, latest_checkpoint


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


class Guard:
    """One run's stop signal and divergence checks; stopping the run closes its progress bar first."""

    def __init__(self, accelerator: Accelerator, lr: float, run_dir: str | Path | None, progress: tqdm) -> None:
        self.accelerator, self.lr, self.run_dir, self.progress = accelerator, lr, run_dir, progress
        self.signum = 0  # the signal number once SIGINT or SIGTERM asked the run to stop
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # no sync per step
        self.last_loss = torch.zeros((), device=accelerator.device)

    @contextmanager
    def stop_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM ask the loop to checkpoint and stop; a second one stops at once."""
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.signum:
                raise KeyboardInterrupt
            self.signum = signum

        previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def watch(self, loss: torch.Tensor) -> None:
        """Note a micro-batch's loss (no device sync)."""
        self.last_loss = loss.detach()
        self.nonfinite |= ~torch.isfinite(self.last_loss)

    def health(self, step: int) -> int:
        """The stop signal (0 if none), agreed by every process (a device sync); a non-finite loss raises."""
        flags = torch.stack([self.nonfinite.float(), torch.tensor(float(self.signum), device=self.nonfinite.device)])
        if self.accelerator.num_processes > 1:  # one small all-reduce: every process stops at the same step
            # torch's own MAX: Accelerate's reduce(reduction="max") exists only from 1.14 on (before, it sums).
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        nonfinite, signum = flags.tolist()
        if nonfinite:  # before anything is saved: a checkpoint with NaN weights would be worse than none
            self.diverged(step, self.last_loss.item())
        return int(signum)

    def check_weights(self, module: nn.Module, step: int) -> None:
        """Non-finite weights or buffers (an update, or BatchNorm statistics, that overflowed) stop the
        run like a non-finite loss: before a checkpoint is saved, and before the final artifacts."""
        with torch.no_grad():
            tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
            finite = torch.stack([t.isfinite().all() for t in tensors]).all()
        if not finite.item():
            self.diverged(step, float("nan"))

    def diverged(self, step: int, loss: float) -> NoReturn:
        self.progress.close()
        latest = latest_checkpoint(self.run_dir) if self.run_dir else None
        raise TrainingDiverged(step, loss, self.lr, self.accelerator.mixed_precision, latest)

    def stop(self, signum: int, step: int) -> NoReturn:
        """Stop for `signum` (the checkpoint of `step` is saved by then, with a run directory)."""
        self.progress.close()
        checkpoint = None
        if self.run_dir is not None:
            checkpoint = Path(self.run_dir) / CHECKPOINTS_DIR / checkpoint_name(step)
        raise Interrupted(signum, step, checkpoint)
