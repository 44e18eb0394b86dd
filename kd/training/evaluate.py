"""Predictions over a whole split, and the metrics of them; the processes' BatchNorm statistics made one."""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from torch import nn

from kd.data.datasets import ImageDataset
from kd.data.loader import DeviceBatches
from kd.errors import KDError
from kd.reports.metrics import classification_metrics


@torch.no_grad()
def predict(net: nn.Module, data: ImageDataset, split: str, batch_size: int,
            accelerator: Accelerator | None = None, num_workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float32 logits and (N,) labels of the whole `split` ("train", "val" or "test"), in order, on the CPU.

    Un-augmented, in eval mode (the network's mode is restored after). With an `accelerator`
    each process predicts its shard on the accelerator's device, in its autocast, and every
    process gets everyone's predictions (the padding that evened the shards dropped); without
    one, a single pass on the CPU. `num_workers`: see `DeviceBatches`.
    """
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank, world_size = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    batches = DeviceBatches(data, split, batch_size, device, rank=rank, world_size=world_size, training=False,
                            num_workers=num_workers)
    was_training = net.training
    net.to(device).eval()
    all_logits, all_labels, all_valid = [], [], []
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        for images, labels, valid, _ in batches:
            all_logits.append(net(images).float())
            all_labels.append(labels)
            all_valid.append(valid)
    net.train(was_training)
    if not all_logits:
        raise KDError(f"the {data.name} {split} split is empty")
    logits, labels, valid = torch.cat(all_logits), torch.cat(all_labels), torch.cat(all_valid)
    if accelerator is not None:
        logits, labels, valid = accelerator.gather(logits), accelerator.gather(labels), accelerator.gather(valid)
    return logits[valid].cpu(), labels[valid].cpu()


def evaluate(net: nn.Module, data: ImageDataset, batch_size: int, accelerator: Accelerator, split: str = "test",
             num_workers: int | None = None) -> dict[str, float]:
    """Metrics over the whole `split` ("test" or "val"), gathered from every process; names prefixed with the split."""
    metrics = classification_metrics(*predict(net, data, split, batch_size, accelerator, num_workers))
    return {f"{split}_{name}": value for name, value in metrics.items()}


@torch.no_grad()
def sync_buffers(module: nn.Module, accelerator: Accelerator) -> None:
    """Give every process the main process's buffers (BatchNorm running statistics).

    Each process's running statistics come from its own shard (DDP is told not to broadcast
    buffers, see `make_accelerator`); without this, each rank would evaluate a slightly
    different network than the one rank 0 saves.
    """
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)
