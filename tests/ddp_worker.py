"""Worker for tests/test_distributed.py, launched by torchrun: the library's own loop under DDP.

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR

Trains twice on a tiny in-memory dataset whose pixels encode each sample's index, with the
LS++ criterion inside the prepared module:

* `sync`:   as the loop does it (the C logits live in the prepared `TrainModule`);
* `nosync`: the control, with DDP told to ignore the C logits (`_ddp_params_and_buffers_to_ignore`),
            so their gradients are not all-reduced;
* `ols`:    Online Label Smoothing, whose per-rank accumulators are summed at each epoch end; each
            rank also records its own accumulators just before that sum.

Every rank writes OUT_DIR/{mode}-rank{r}.safetensors (its network weights and C logits) and
OUT_DIR/{mode}-rank{r}.json (the sample indices it trained on per epoch, the gathered test
metrics, and a single-process evaluation of its own network over the whole test split).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kd.data.datasets import ImageDataset, InMemorySplit
from kd.data.loader import shard_indices
from kd.methods import build_method
from kd.reports.metrics import classification_metrics
from kd.training.loop import TrainModule, fit, make_accelerator
from kd.training.settings import Settings

NUM_CLASSES = 4
TRAIN_SAMPLES = 96  # 2 ranks x 6 batches x 8
TEST_SAMPLES = 45  # odd: the last shard is padded, and evaluation must drop the padding
BATCH = 8
EPOCHS = 2


def indexed_split(count: int, offset: int, generator: torch.Generator) -> InMemorySplit:
    """1 x 4 x 4 uint8 images: pixel (0, 0) holds index % 256, pixel (0, 1) index // 256, the rest noise."""
    images = torch.randint(0, 256, (count, 1, 4, 4), generator=generator, dtype=torch.uint8)
    index = torch.arange(offset, offset + count)
    images[:, 0, 0, 0] = (index % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (index // 256).to(torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
    return InMemorySplit(images, labels)


def make_data() -> ImageDataset:
    generator = torch.Generator().manual_seed(1234)
    return ImageDataset(
        name="indexed", class_names=[f"c{i}" for i in range(NUM_CLASSES)], channels=1, image_size=4,
        train=indexed_split(TRAIN_SAMPLES, 0, generator), test=indexed_split(TEST_SAMPLES, 1000, generator),
        in_memory=True, default_augment=(), mean=(0.0,), std=(1.0,),
    )


class RecordingNet(nn.Module):
    """A small MLP (with BatchNorm, whose running statistics must end up equal too) that notes which sample indices pass through it while training."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)
        )
        self.seen: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            pixels = torch.round(images[:, 0, 0, :2].float() * 255).long()  # mean 0, std 1: x / 255
            self.seen.extend((pixels[:, 0] + 256 * pixels[:, 1]).tolist())
        return self.body(images)


def run(mode: str, out: Path, accelerator) -> None:
    torch.manual_seed(0)  # the same initial network on every rank (DDP would broadcast it anyway)
    data = make_data()
    net = RecordingNet()
    method = build_method("ols" if mode == "ols" else "lspp", NUM_CLASSES, **({} if mode == "ols" else {"alpha": 0.3}))
    module = TrainModule(net, method)
    if mode == "nosync":
        module._ddp_params_and_buffers_to_ignore = ["criterion.logits"]
    local_sums: list[torch.Tensor] = []
    if mode == "ols":
        swap = method.on_epoch_end

        def record_then_swap(context):
            local_sums.append(torch.cat([method.sums, method.counts[:, None]], dim=1).clone())
            swap(context)

        method.on_epoch_end = record_then_swap
    settings = Settings(epochs=EPOCHS, batch_size=BATCH, lr=0.5, weight_decay=0.0, seed=3)
    result = fit(module, data, settings, accelerator, warmup_fraction=0.0, desc=mode)

    steps_per_epoch = TRAIN_SAMPLES // accelerator.num_processes // BATCH
    per_epoch = len(net.seen) // EPOCHS
    seen = [net.seen[e * per_epoch : (e + 1) * per_epoch] for e in range(EPOCHS)]

    net.eval()
    with torch.no_grad():
        images = data.test.images.float() / 255
        logits = net(images)
    everything = classification_metrics(logits, data.test.labels)
    shard, valid = shard_indices(TEST_SAMPLES, rank=accelerator.process_index, world_size=accelerator.num_processes, shuffle=False)
    shard = shard[valid]
    own_shard = classification_metrics(logits[shard], data.test.labels[shard])

    rank = accelerator.process_index
    tensors = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    if mode == "ols":
        tensors["soft_labels"] = method.soft_labels.clone()
        tensors.update({f"local_sums_epoch{e}": sums for e, sums in enumerate(local_sums)})
    else:
        tensors["cmatrix_logits"] = method.logits.detach().clone()
    save_file(tensors, str(out / f"{mode}-rank{rank}.safetensors"))
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps({
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "backend": accelerator.state.backend,
        "steps": result.steps,
        "steps_per_epoch": steps_per_epoch,
        "seen": seen,
        "gathered_metrics": result.metrics,
        "single_process_metrics": everything,  # this rank's network over the whole test split
        "own_shard_metrics": own_shard,  # ... and over its own test shard only
    }))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator()
    for mode in ("sync", "nosync", "ols"):
        run(mode, out, accelerator)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
