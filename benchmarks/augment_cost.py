"""What each augmentation costs, as a share of a training step of the paper's AlexNet on CIFAR-10.

    python benchmarks/augment_cost.py [--data-dir .data/cifar10-jpeg] [--model alexnet] [--steps 20] [--repeats 5]

The CIFAR-10 copy is decoded once and its batches are moved to the device the pipeline runs on
(as the training loop holds in-memory data there), so no host-to-device copy is timed. Then, in
every repeat (after an untimed warm-up round of every op and every step variant), in a rotating
order:

* each augmentation alone, and the two goal pipelines, are timed on real batches of
  `--batch-size` uint8 images through the toolkit's own `kd.data.augment` pipeline (normalisation
  included, `--batches` batches each); on a GPU the device is synchronised before the clock
  starts and before it stops, so queued kernels are counted, not just their launches;
* whole training steps are timed through the training loop (`fit`, `--steps` steps, which times
  its steps between device synchronisations) with no augmentation, with
  crop,flip,cutout,mixup,cutmix, and with randaugment.

Reported: per-op milliseconds per batch (min and median over repeats), each op's share of the
median un-augmented step, and the measured step ratios (augmented / plain, per repeat, min and
median). Writes benchmarks/results/augment_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from kd.data.augment import AugmentOptions, build_pipeline
from kd.data.datasets import load_dataset
from kd.data.loader import Normalize
from kd.device import synchronize
from kd.methods import build_method
from kd.models.networks import build_model
from kd.training.loop import TrainModule, fit, make_accelerator
from kd.training.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from student_modes import RESULTS, ROOT, ensure_cifar10  # noqa: E402

SINGLE = ("crop", "flip", "cutout", "randaugment", "mixup", "cutmix")
CHEAP = ("crop", "flip", "cutout", "mixup", "cutmix")  # goal: <= 5% of a step together
STEP_VARIANTS = {"none": (), "crop,flip,cutout,mixup,cutmix": CHEAP, "randaugment": ("randaugment",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "cifar10-jpeg")
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, default=20, help="batches per augmentation timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    data = load_dataset("imagefolder", str(ensure_cifar10(args.data_dir)))
    accelerator = make_accelerator()
    device = accelerator.device
    count = args.batch_size * args.batches
    # On the pipeline's device, as the training loop holds in-memory data: no host-to-device copy is timed.
    images, labels = data.train.images[:count].to(device), data.train.labels[:count].to(device)
    normalize = Normalize(data.mean, data.std, device)
    ops = {name: (name,) for name in SINGLE} | {",".join(CHEAP): CHEAP}

    def op_ms(names: tuple[str, ...]) -> float:
        pipe = build_pipeline(AugmentOptions(names), image_size=data.image_size, num_classes=data.num_classes,
                              normalize=normalize, generator=torch.Generator(device=device).manual_seed(0),
                              host_generator=torch.Generator().manual_seed(1))
        synchronize(device)  # nothing queued before the clock starts ...
        started = time.perf_counter()
        for b in range(args.batches):
            pipe(images[b * args.batch_size:(b + 1) * args.batch_size], labels[b * args.batch_size:(b + 1) * args.batch_size])
        synchronize(device)  # ... and everything launched has run when it stops
        return (time.perf_counter() - started) / args.batches * 1000

    def step_ms(names: tuple[str, ...]) -> float:
        set_seed(0)
        net = build_model(args.model, data.num_classes, data.channels, data.image_size)
        module = TrainModule(net, build_method("lspp", data.num_classes))
        settings = Settings(epochs=1, batch_size=args.batch_size, lr=0.05, weight_decay=5e-4, max_steps=args.steps)
        result = fit(module, data, settings, accelerator, augment=AugmentOptions(names), evaluate=False, desc="+".join(names) or "none")
        return result.train_seconds / result.steps * 1000

    print(f"{data.describe()} | {args.model} | batch {args.batch_size} | {args.repeats} repeats", flush=True)
    for names in ops.values():  # warm-up, not recorded: kernel set-up and first allocations of every op and step variant
        op_ms(names)
    for names in STEP_VARIANTS.values():
        step_ms(names)
    op_times: dict[str, list[float]] = {key: [] for key in ops}
    step_times: dict[str, list[float]] = {key: [] for key in STEP_VARIANTS}
    for repeat in range(args.repeats):
        keys = list(ops)[repeat % len(ops):] + list(ops)[: repeat % len(ops)]
        for key in keys:
            op_times[key].append(op_ms(ops[key]))
        variants = list(STEP_VARIANTS)[repeat % 3:] + list(STEP_VARIANTS)[: repeat % 3]
        for key in variants:
            step_times[key].append(step_ms(STEP_VARIANTS[key]))
        print(f"repeat {repeat + 1}: " + "  ".join(f"{k} {v[-1]:.1f} ms" for k, v in step_times.items()), flush=True)

    def summary(values: list[float]) -> dict[str, float]:
        return {"min": min(values), "median": statistics.median(values), "all": values}

    plain = statistics.median(step_times["none"])
    ratios = {key: [a / b for a, b in zip(step_times[key], step_times["none"])] for key in STEP_VARIANTS if key != "none"}
    report = {
        "command": " ".join(["python", "benchmarks/augment_cost.py", *sys.argv[1:]]),
        "dataset": data.describe(), "model": args.model, "batch_size": args.batch_size, "steps": args.steps,
        "batches": args.batches, "repeats": args.repeats, "device": str(device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "op_ms": {key: summary(values) for key, values in op_times.items()},
        "op_share_of_plain_step": {key: statistics.median(values) / plain for key, values in op_times.items()},
        "step_ms": {key: summary(values) for key, values in step_times.items()},
        "step_ratio": {key: summary(values) for key, values in ratios.items()},
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / "augment_cost"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Augmentation cost, side by side",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['dataset']}; model {args.model}; batch {args.batch_size}; {args.repeats} repeats after a warm-up "
        f"round; {report['device']}, {report['machine']}, torch {report['torch']}. A plain training step (no "
        f"augmentation) took {plain:.1f} ms (median).",
        "",
        "| augmentation | ms per batch (min) | ms per batch (median) | share of a plain step |",
        "|---|---|---|---|",
        *[f"| {key} | {min(v):.2f} | {statistics.median(v):.2f} | {report['op_share_of_plain_step'][key]:.1%} |"
          for key, v in op_times.items()],
        "",
        "Whole training steps, augmented / plain, per repeat (goals: the cheap pipeline <= 1.05, randaugment <= 1.25):",
        "",
        "| pipeline | step ratio (min) | step ratio (median) |",
        "|---|---|---|",
        *[f"| {key} | {min(v):.3f} | {statistics.median(v):.3f} |" for key, v in ratios.items()],
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
