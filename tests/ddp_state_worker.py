"""Worker for tests/test_ddp_state.py, launched by torchrun: per-rank state under DDP.

    torchrun --nproc_per_node 2 tests/ddp_state_worker.py OUT_DIR

OLS's per-rank statistics: 
Each rank runs three training forwards of an OLS `TrainModule` prepared by the toolkit's own
accelerator, on its own shard of a fixed data set, without optimizer steps (the network stays
the same on both ranks). It records its accumulators after the forwards, the statistics it
should hold from its own samples alone (computed here, outside the method), and, after the
epoch-end all-reduce, the soft-label matrix next to the one a single process computes from
the union of both ranks' samples.

The stop-signal agreement: rank 0 asks to stop with SIGTERM (15), rank 1 with SIGINT (2); every
rank must agree on one of them (the largest), not on their sum.

Written to OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from kd.methods import build_method
from kd.methods.base import EpochContext, StepContext
from kd.training.guards import Guard
from kd.training.loop import TrainModule, make_accelerator

K, FEATURES, BATCH, STEPS = 4, 6, 8, 3


def ols_statistics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: the sum of softmax outputs over correctly classified samples, and their count."""
    p = torch.softmax(logits.double(), dim=1)
    correct = p.argmax(dim=1) == labels
    sums, counts = torch.zeros(K, K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for row, label, ok in zip(p, labels, correct):
        if ok:
            sums[label] += row
            counts[label] += 1
    return sums, counts


def agreed_signal(accelerator) -> int:
    guard = Guard(accelerator, lr=0.1, run_dir=None, progress=None)
    guard.signum = 15 if accelerator.process_index == 0 else 2
    return guard.health(step=0)


def main(out: Path) -> None:
    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(world * STEPS * BATCH, FEATURES, generator=generator)
    labels = torch.randint(0, K, (world * STEPS * BATCH,), generator=generator)
    torch.manual_seed(0)
    net = nn.Linear(FEATURES, K)
    with torch.no_grad():  # a network that gets some samples of every class right
        net.weight.copy_(torch.randn(K, FEATURES, generator=generator))
    module = accelerator.prepare(TrainModule(net, build_method("ols", K)))
    method = accelerator.unwrap_model(module).criterion
    mine = slice(rank * STEPS * BATCH, (rank + 1) * STEPS * BATCH)
    for step in range(STEPS):
        batch = slice(mine.start + step * BATCH, mine.start + (step + 1) * BATCH)
        parts = module(features[batch], labels[batch], StepContext(epoch=0, step=step, total_steps=STEPS, steps_per_epoch=STEPS))
        accelerator.backward(parts["loss"])
    own_sums, own_counts = method.sums.clone(), method.counts.clone()
    with torch.no_grad():
        logits = net(features)
    expected_sums, expected_counts = ols_statistics(logits[mine], labels[mine])
    method.on_epoch_end(EpochContext(epoch=0, step=STEPS, total_steps=STEPS,
                                     all_reduce_sum=lambda tensor: accelerator.reduce(tensor, reduction="sum")))
    union_sums, union_counts = ols_statistics(logits, labels)
    uniform = torch.full((K, K), 1.0 / K, dtype=torch.float64)
    union = torch.where(union_counts[:, None] > 0, union_sums / union_counts.clamp(min=1)[:, None], uniform)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "own_sums": own_sums.tolist(), "own_counts": own_counts.tolist(),
        "expected_sums": expected_sums.tolist(), "expected_counts": expected_counts.tolist(),
        "soft_labels": method.soft_labels.tolist(), "union_soft_labels": union.tolist(),
        "agreed_signal": agreed_signal(accelerator),
    }))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
