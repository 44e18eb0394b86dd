"""One teacher epoch on CIFAR-10 (32x32) with ResNet-18 in bf16: images/s and peak memory.

    python benchmarks/gpu_teacher_epoch.py [--data-dir .data/cifar10-jpeg] [--batch-size 256]
        [--mixed-precision bf16] [--max-steps N] [--warmup-steps 1] [--results-dir benchmarks/results]

Runs the real `kd train-teacher` (the same code path users get: the console script's entry
point, in this process) with `--dataset imagefolder --model cifar_resnet18 --epochs 1`, on
whatever device Accelerate picks (a GPU where there is one). First, in the same process, an
untimed warm-up run of `--warmup-steps` steps (1; 0 for none) with the same flags, so that the
timed epoch does not count CUDA's and cuDNN's set-up (context, lazy kernel loading, cuDNN's
algorithm search for each convolution shape, the allocator's first blocks), which in a
few-second epoch is a large share. The loop times its steps between device synchronisations.
If --data-dir is missing it is unpacked from the shared CIFAR-10 JPEG copy
(../shared/data/cifar10-jpeg.zip, or shared/data/ inside the project). Writes
<results-dir>/gpu_teacher_epoch.json and .md: images/s over the training steps, peak memory
(CUDA allocator peak on a GPU, peak RSS on the CPU), the device, and both commands.

The test suite runs it on the CPU for two steps on a small CIFAR slice, so the GPU path
cannot rot; the recorded numbers come from a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ZIP_CANDIDATES = (ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip", ROOT / "shared" / "data" / "cifar10-jpeg.zip")
NAME = "gpu_teacher_epoch"


def ensure_data(data_dir: Path) -> None:
    if (data_dir / "train").is_dir():
        return
    archive = next((path for path in ZIP_CANDIDATES if path.is_file()), None)
    if archive is None:
        sys.exit(f"{data_dir} is missing and no cifar10-jpeg.zip was found at {', '.join(map(str, ZIP_CANDIDATES))}")
    print(f"unpacking {archive} into {data_dir} ...", flush=True)
    partial = data_dir.with_name(data_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(partial)
    if data_dir.exists():
        data_dir.rmdir()  # an empty leftover; a non-empty one without train/ stops here
    partial.rename(data_dir)  # only a complete copy gets the final name


def run_kd(argv: list[str]) -> None:
    """`kd ARGV` through the console script's entry point, in this process; stops like the command if it fails."""
    from accelerate.state import AcceleratorState, GradientState

    from lspp_kd.cli.main import main as kd_main

    code: int | str | None = 0
    try:
        kd_main(argv)
    except SystemExit as exit_:
        code = exit_.code
    finally:  # the next command starts with a clean Accelerate state
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if code not in (0, None):
        sys.exit(f"kd {shlex.join(argv)} failed (exit code {code})")


def reset_gpu_peak() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:
        pass


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken driver should not lose the measurement
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "cifar10-jpeg")
    parser.add_argument("--model", default="cifar_resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs on the CPU)")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="untimed steps of a warm-up run in the same process before the timed epoch (0: none)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    ensure_data(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        flags = [
            "train-teacher", "--dataset", "imagefolder", "--data-dir", str(args.data_dir),
            "--model", args.model, "--mixed-precision", args.mixed_precision, "--epochs", "1",
            "--batch-size", str(args.batch_size),
        ]
        command = [*flags, "--out", str(out)]
        if args.max_steps is not None:
            command += ["--max-steps", str(args.max_steps)]
        if args.warmup_steps > 0:  # the same shapes, kernels and precision: their set-up is done before the timed run
            print(f"warm-up: {args.warmup_steps} untimed step(s) in this process ...", flush=True)
            run_kd([*flags, "--out", str(Path(tmp) / "warmup"), "--max-steps", str(args.warmup_steps)])
            reset_gpu_peak()
        run_kd(command)
        metrics = json.loads((out / "metrics.json").read_text())
        config = json.loads((out / "config.json").read_text())

    kd_command = shlex.join(["kd", *command]).replace(str(out), "RUN_DIR")
    report = {
        "command": shlex.join(["python", "benchmarks/gpu_teacher_epoch.py", *sys.argv[1:]]),
        "kd_command": kd_command,
        "model": args.model,
        "dataset": config["dataset_name"],
        "image_size": config["image_size"],
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "warmup_steps": args.warmup_steps,
        "steps": metrics["steps"],
        "train_seconds": metrics["train_seconds"],
        "images_per_second": metrics["images_per_second"],
        "peak_memory_mb": metrics["peak_memory_mb"],
        "peak_memory_kind": metrics["peak_memory_kind"],
        "device": metrics["device"],
        "gpu": gpu_name(),
        "world_size": metrics["world_size"],
        "test_top1_after_one_epoch": metrics.get("test_top1"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    report["train_images"] = metrics["steps"] * metrics["effective_batch_size"]

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / NAME
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    memory = "peak GPU memory (CUDA max allocated)" if report["peak_memory_kind"] == "cuda_max_allocated" else "peak memory (process RSS)"
    lines = [
        f"# One teacher epoch: {args.model} on CIFAR-10 32x32, {args.mixed_precision}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Runs: `{kd_command}`",
        "",
        "| device | batch | steps | images/s | " + memory + " (MiB) | train s |",
        "|---|---|---|---|---|---|",
        f"| {report['gpu'] or report['device']} | {args.batch_size} | {report['steps']} | {report['images_per_second']:.0f} "
        f"| {report['peak_memory_mb']:.0f} | {report['train_seconds']:.1f} |",
        "",
        "images/s counts training steps only (data loading before the epoch and the test pass excluded), timed "
        f"between device synchronisations, after {args.warmup_steps} untimed warm-up step(s) in the same process.",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(f"{report['images_per_second']:.0f} images/s, peak {report['peak_memory_mb']:.0f} MiB on {report['gpu'] or report['device']} -> {stem}.json")


if __name__ == "__main__":
    main()
