"""The training state the loop reads and writes, and how a checkpoint of it is saved.

Accelerate's `save_state` holds the model, optimizer, schedule and RNG states; `TrainState`,
registered with `accelerator.register_for_checkpointing`, holds the rest: where the run is,
what it has logged, and what differs between processes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from kd.data.loader import DeviceBatches
from kd.errors import KDError
from kd.methods.base import Method
from kd.io import failed_write, free_bytes
from kd.training.rundir import CHECKPOINTS_DIR, checkpoint_name, commit_checkpoint, latest_checkpoint, temporary_checkpoint_dir


class TrainState:
    """The run's position and logs (the loop's own variables) and, at a checkpoint, every process's state.

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
        self.summary: list[dict[str, float]] = []  # completed epochs' summary.csv rows
        self.epoch_start_seconds = 0.0  # train_seconds when the current epoch began
        # Per process, as of the last checkpoint (or load): the current epoch's micro-batches and loss sums so far.
        self.epoch_batches = 0
        self.part_sums: list[dict[str, float]] = [{} for _ in range(world_size)]
        self.generator_states: list[torch.Tensor] | None = None
        # The augmentation's host generator (a GPU run's; on the CPU it is the generator above: None).
        self.host_generator_states: list[torch.Tensor | None] = [None] * world_size
        self.method_states: list[dict[str, torch.Tensor]] = [{} for _ in range(world_size)]

    def own_part_sums(self, device: torch.device) -> dict[str, torch.Tensor]:
        """This process's loss sums of the epoch under way when the state was captured."""
        return {name: torch.tensor(value, device=device) for name, value in self.part_sums[self.rank].items()}

    def capture(self, epoch_batches: int, part_sums: dict[str, torch.Tensor]) -> None:
        """Gather every process's state for a checkpoint; a collective call (every process must call it)."""
        host = self.batches.host_generator
        mine = [(
            self.batches.generator.get_state().cpu(),
            {name: float(value.item()) for name, value in part_sums.items()},
            {name: value.detach().cpu().clone() for name, value in self.method.rank_state().items()},
            host.get_state() if host is not self.batches.generator else None,
        )]
        everyone = gather_object(mine)
        self.epoch_batches = epoch_batches
        self.generator_states = [generator for generator, _, _, _ in everyone]
        self.part_sums = [sums for _, sums, _, _ in everyone]
        self.method_states = [method_state for _, _, method_state, _ in everyone]
        self.host_generator_states = [host_state for _, _, _, host_state in everyone]

    def save(self, accelerator: Accelerator, run_dir: str | Path, epoch_batches: int, part_sums: dict[str, torch.Tensor]) -> Path:
        """Capture the state and save a checkpoint of the run at its current step (every process must call it)."""
        self.capture(epoch_batches, part_sums)
        return save_checkpoint(accelerator, run_dir, self.step)

    def state_dict(self) -> dict:
        return {
            "format": self.FORMAT,
            "step": self.step,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "epoch_batches": self.epoch_batches,
            "part_sums": self.part_sums,
            "generator_states": self.generator_states,
            "host_generator_states": self.host_generator_states,
            "method_states": self.method_states,
            "world_size": self.world_size,
            "summary": self.summary,
            "epoch_start_seconds": self.epoch_start_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != self.FORMAT:
            raise KDError(f"--resume: the checkpoint's training state is {state.get('format')!r}, this kd reads {self.FORMAT} only")
        if state["world_size"] != self.world_size:
            raise KDError(
                f"--resume: the checkpoint was written by {state['world_size']} process(es), this run has "
                f"{self.world_size}; resume with the same number of processes"
            )
        self.step = int(state["step"])
        self.history = {name: list(values) for name, values in state["history"].items()}
        self.train_seconds = float(state["train_seconds"])
        self.epoch_batches = int(state["epoch_batches"])
        self.part_sums = list(state["part_sums"])
        self.generator_states = state["generator_states"]
        self.method_states = list(state["method_states"])
        self.summary = [dict(row) for row in state["summary"]]
        self.epoch_start_seconds = float(state["epoch_start_seconds"])
        self.batches.generator.set_state(self.generator_states[self.rank])
        # Absent from CPU runs' checkpoints, whose host generator is the one above.
        self.host_generator_states = list(state.get("host_generator_states") or [None] * self.world_size)
        if self.host_generator_states[self.rank] is not None:
            self.batches.host_generator.set_state(self.host_generator_states[self.rank])
        self.method.load_rank_state(self.method_states[self.rank])


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int) -> Path:
    """`save_state` into a temporary directory on every process; the main process then renames it.

    A checkpoint that does not fit (the space the last one took is checked first) or whose write
    fails (a full disk, a quota) is a one-line `KDError`; its temporary directory is removed and
    the last complete checkpoint stays, for `--resume` once there is space.
    """
    tmp = temporary_checkpoint_dir(run_dir, step)
    _check_space(Path(run_dir), step)  # every process: they all stop, not just the main one
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # an unfinished save of the same step by a killed run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        final = commit_checkpoint(tmp, step) if accelerator.is_main_process else tmp.parent / checkpoint_name(step)
    except Exception as error:  # noqa: BLE001 - the serializers' own error types; anything else is re-raised
        failure = failed_write(f"checkpoint {checkpoint_name(step)}", tmp.parent, error)
        if failure is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise KDError(f"{failure}{_resume_hint(Path(run_dir))}") from None
    accelerator.wait_for_everyone()
    return final


def check_room_for_checkpoints(run_dir: str | Path, module: torch.nn.Module) -> None:
    """Before training: a one-line `KDError` when not even one checkpoint can fit in `run_dir`.

    A checkpoint holds at least the weights and buffers and as much again of optimizer state
    (SGD's momentum), so that is the least it needs; later checkpoints are checked against the
    size of the last one (`save_checkpoint`).
    """
    need = 2 * sum(tensor.numel() * tensor.element_size() for tensor in module.state_dict().values())
    free = free_bytes(run_dir)
    if latest_checkpoint(run_dir) is None and free is not None and need > free:
        raise KDError(f"no room for checkpoints in {Path(run_dir) / CHECKPOINTS_DIR}: each needs at least "
                      f"{_size(need)}, {_size(free)} free; free some space or choose another --out")


def _check_space(run_dir: Path, step: int) -> None:
    """A one-line `KDError` before writing when the last checkpoint's size is not free any more."""
    last = latest_checkpoint(run_dir)
    free = free_bytes(run_dir)
    if last is None or free is None:
        return
    size = sum(file.stat().st_size for file in last.rglob("*") if file.is_file())
    if size > free:
        raise KDError(f"cannot write checkpoint {checkpoint_name(step)} in {run_dir / CHECKPOINTS_DIR}: it needs about "
                      f"{_size(size)} (the last one's size), {_size(free)} free{_resume_hint(run_dir)}")


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count // 1024} KiB"


def _resume_hint(run_dir: Path) -> str:
    last = latest_checkpoint(run_dir)
    if last is None:
        return "; no checkpoint is complete: free some space and run again with --overwrite"
    return f"; {last.name} is complete: free some space and add --resume"
