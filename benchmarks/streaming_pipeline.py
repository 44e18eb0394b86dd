"""The streaming data path at a pretrained model's input size against torchvision's standard pipeline.

    python benchmarks/streaming_pipeline.py [--size 128] [--per-class 500] [--repeats 5] [--workers 2] [--device cpu]

Data: the CIFAR-10 copy's first `--per-class` training images of every class, resized once to
`--size` px JPEGs (quality 90) under .data/ (as a folder of larger images a user fine-tunes on).

* ours: `kd.data.datasets.load_dataset("imagefolder", image_size=SIZE)` streams it (the header check
  of every file happens once, before timing) and `kd.data.loader.DeviceBatches` yields training
  batches: decoded in `--workers` DataLoader workers (torchvision.io for JPEG), then the random
  resized crop, flip and normalisation on the batch, as `kd train-teacher` trains.
* torchvision: `ImageFolder` + `RandomResizedCrop(SIZE)` + `RandomHorizontalFlip` + `ToTensor` +
  `Normalize` per sample (PIL), `DataLoader(batch, shuffle, num_workers=--workers)`: the standard recipe.

Each repeat runs ours, then torchvision, each in a fresh subprocess (so peak memory is its own: the
process's maximum resident set size plus its largest worker's), interleaved; the first batch (worker start-up)
is not timed; images per second over the rest of one epoch. Min and median over the repeats, ratios
of the medians. "Where the time goes": one process, no workers, per batch: reading the files, decoding,
and the batch transforms, timed apart. Writes benchmarks/results/streaming_pipeline.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seeds import RESULTS  # noqa: E402
from student_modes import ROOT, ensure_cifar10  # noqa: E402

BATCH = 64


def resized_copy(cifar: Path, size: int, per_class: int, dest: Path) -> Path:
    """The first `per_class` training images of each class (and 20 test ones) as `size`-px JPEGs."""
    from PIL import Image

    if (dest / "done").exists():
        return dest
    for split, count in (("train", per_class), ("test", 20)):
        for folder in sorted((cifar / split).iterdir()):
            out = dest / split / folder.name
            out.mkdir(parents=True, exist_ok=True)
            for file in sorted(folder.iterdir())[:count]:
                Image.open(file).convert("RGB").resize((size, size), Image.BICUBIC).save(out / f"{file.stem}.jpg", quality=90)
    (dest / "done").write_text("")
    return dest


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    largest_worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest finished child's
    return (own + largest_worker) / 1024  # KiB on Linux


def measure(pipeline: str, data_dir: Path, size: int, workers: int, device_name: str = "cpu") -> dict:
    """One epoch of training batches through `pipeline` ("ours" or "torchvision"), in this process, delivered
    on `device_name` (ours augments and normalises the batch there; torchvision's batches are copied there)."""
    import torch

    device = torch.device(device_name)

    if pipeline == "ours":
        from kd.data.augment import AugmentOptions
        from kd.data.datasets import load_dataset
        from kd.data.loader import DeviceBatches

        data = load_dataset("imagefolder", data_dir, image_size=size)
        assert not data.in_memory
        batches = DeviceBatches(data, "train", BATCH, device, augment=AugmentOptions(("crop", "flip")), num_workers=workers)
        batches.set_epoch(0)
        items = (images for images, _, _, _ in batches)
    else:
        from torchvision import datasets, transforms

        transform = transforms.Compose([
            transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])
        dataset = datasets.ImageFolder(str(data_dir / "train"), transform=transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
                                             persistent_workers=False, pin_memory=device.type == "cuda")
        items = (images.to(device, non_blocking=True) for images, _ in loader)
    first = next(items)  # worker start-up and the first batch: not timed
    assert first.shape[-1] == size
    started, images = time.perf_counter(), 0
    for batch in items:
        images += batch.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if images == 0:
        raise SystemExit(f"one batch of {BATCH} only: pass a larger --per-class")
    return {"images_per_second": images / seconds, "images": images, "seconds": seconds, "peak_memory_mb": _peak_mb()}


def where_the_time_goes(data_dir: Path, size: int, batches: int = 10) -> dict:
    """Ours in one process, per batch of BATCH images: read the files, decode (and resize), batch transforms."""
    import numpy as np
    import torch

    from kd.data.augment import AugmentOptions
    from kd.data.datasets import load_dataset
    from kd.data.decode import _decode_one
    from kd.data.loader import DeviceBatches

    data = load_dataset("imagefolder", data_dir, image_size=size)
    files = [path for path, _ in data.train.samples][: batches * BATCH]
    started = time.perf_counter()
    for path in files:
        np.fromfile(path, dtype=np.uint8)
    read = time.perf_counter() - started
    started = time.perf_counter()
    for path in files:
        _decode_one(path, 3, size)
    decode = time.perf_counter() - started - read  # decoding reads the file again (from the page cache)
    loader = DeviceBatches(data, "train", BATCH, torch.device("cpu"), augment=AugmentOptions(("crop", "flip")), num_workers=0)
    loader.set_epoch(0)
    started, done = time.perf_counter(), 0
    for _ in zip(range(batches), loader):
        done += 1
    whole = (time.perf_counter() - started) / done * 1000
    per_file = 1000 * BATCH / len(files)  # seconds over all files -> ms per batch
    return {"read_ms_per_batch": read * per_file, "decode_ms_per_batch": decode * per_file, "whole_batch_ms_no_workers": whole,
            "rest_ms_per_batch": max(whole - (read + decode) * per_file, 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the batches are delivered (cuda: ours augments there)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "cifar10-jpeg")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="", help="results file suffix: streaming_pipeline_NAME.json")
    parser.add_argument("--one", choices=["ours", "torchvision"], help=argparse.SUPPRESS)  # a subprocess's single measurement
    parser.add_argument("--copy", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.copy, args.size, args.workers, args.device)))
        return
    cifar = ensure_cifar10(args.data_dir)
    copy = resized_copy(cifar, args.size, args.per_class, args.data_dir.parent / f"cifar10-{args.size}px-{args.per_class}")
    runs: dict[str, list[dict]] = {"ours": [], "torchvision": []}
    for repeat in range(args.repeats):
        for pipeline in runs:
            argv = [sys.executable, __file__, "--one", pipeline, "--copy", str(copy), "--size", str(args.size),
                    "--workers", str(args.workers), "--device", args.device]
            result = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "KD_NO_PROGRESS": "1"})
            if result.returncode != 0:
                raise SystemExit(f"{pipeline}: {result.stderr.strip()[-500:]}")
            runs[pipeline].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1} {pipeline}: {runs[pipeline][-1]['images_per_second']:.0f} img/s", flush=True)
    split = where_the_time_goes(copy, args.size)

    def stat(pipeline: str, key: str) -> tuple[float, float]:
        values = [run[key] for run in runs[pipeline]]
        return min(values), statistics.median(values)

    command = " ".join(["python", "benchmarks/streaming_pipeline.py", *sys.argv[1:]])
    lines = [
        f"# Streaming at {args.size} px: ours vs torchvision's standard pipeline", "",
        f"Command: `{command}`. {platform.machine()}, {os.cpu_count()} CPUs, {args.workers} DataLoader workers each, batches delivered on {args.device}, "
        f"batch {BATCH}, {args.per_class * 10} training JPEGs of {args.size} px (CIFAR-10 resized), one epoch per run after "
        f"its first batch; {args.repeats} repeats, interleaved, each in a fresh process.", "",
        "| pipeline | img/s (min / median) | peak memory MB, process + largest worker (min / median) |", "|---|---|---|",
    ]
    for pipeline in runs:
        (lo, mid), (mlo, mmid) = stat(pipeline, "images_per_second"), stat(pipeline, "peak_memory_mb")
        lines.append(f"| {pipeline} | {lo:.0f} / {mid:.0f} | {mlo:.0f} / {mmid:.0f} |")
    ratio = stat("ours", "images_per_second")[1] / stat("torchvision", "images_per_second")[1]
    lines += ["", f"ours / torchvision (medians): {ratio:.2f}x", "",
              f"Where ours spends a batch of {BATCH} in one process without workers (ms): reading the files "
              f"{split['read_ms_per_batch']:.1f}, decoding and resizing {split['decode_ms_per_batch']:.1f}, the rest "
              f"(collation, crop, flip, normalisation) {split['rest_ms_per_batch']:.1f}; the whole batch "
              f"{split['whole_batch_ms_no_workers']:.1f}."]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = "streaming_pipeline" + (f"_{args.name}" if args.name else "")
    (args.results_dir / f"{stem}.json").write_text(json.dumps(
        {"command": command, "size": args.size, "workers": args.workers, "device": args.device, "batch": BATCH, "runs": runs,
         "ours_over_torchvision_median": ratio, "where_the_time_goes": split}, indent=2) + "\n")
    (args.results_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
