"""Step time of the three student modes side by side: plain, proxy teacher (PT-LS++), classic KD.

    python benchmarks/student_modes.py [--data-dir .data/cifar10-jpeg] [--student small_cnn]
        [--teacher RUN_DIR | --teacher-model alexnet_cifar3x3] [--steps 40] [--repeats 5] [--batch-size 128]

The dataset is decoded once; then, for each repeat, the three modes train the same student
(same seed, same batches) for a fixed number of steps through the toolkit's own loop (`fit`), one
after the other, in a rotating order. Ratios are taken within a repeat (side by side, same
machine state) and reported as min and median over repeats. One untimed warm-up round runs
first. Step time does not depend on the weights, so without --teacher a randomly initialised
teacher of --teacher-model and a uniform C-matrix are used.

Writes benchmarks/results/student_modes_<dataset>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import zipfile
from pathlib import Path

import torch
from accelerate.utils import set_seed

from kd.cmatrix.artifact import CMatrix, load_cmatrix
from kd.data.datasets import load_dataset
from kd.losses import DEFAULT_ALPHA
from kd.methods import build_method
from kd.models.networks import build_model, count_parameters
from kd.training.loop import TrainModule, fit, make_accelerator
from kd.training.rundir import CMATRIX_FILE, load_run_model
from kd.training.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CIFAR_ZIP = ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
MODES = ("plain", "proxy", "kd")
METHOD = {"plain": "onehot", "proxy": "proxy", "kd": "kd"}


def ensure_cifar10(data_dir: Path) -> Path:
    """Unpack the shared CIFAR-10 copy into the ignored .data/ folder on first use."""
    if (data_dir / "train").is_dir():
        return data_dir
    if not CIFAR_ZIP.exists():
        sys.exit(f"no dataset at {data_dir} and no {CIFAR_ZIP} to unpack")
    print(f"unpacking {CIFAR_ZIP} -> {data_dir}", flush=True)
    with zipfile.ZipFile(CIFAR_ZIP) as archive:
        archive.extractall(data_dir)
    return data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="imagefolder")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "cifar10-jpeg")
    parser.add_argument("--student", default="small_cnn")
    parser.add_argument("--teacher", type=Path, help="teacher run directory (its weights and cmatrix.safetensors)")
    parser.add_argument("--teacher-model", default="alexnet_cifar3x3", help="random-init teacher when --teacher is not given")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--name", default="cifar10", help="results file suffix")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.dataset == "imagefolder":
        ensure_cifar10(args.data_dir)
    data = load_dataset(args.dataset, str(args.data_dir))
    accelerator = make_accelerator(args.mixed_precision)

    if args.teacher:
        teacher, teacher_config = load_run_model(args.teacher)
        teacher_name = teacher_config["model"]
        cmatrix = load_cmatrix(args.teacher / CMATRIX_FILE, expected_class_names=data.class_names)
    else:
        set_seed(1)
        teacher = build_model(args.teacher_model, data.num_classes, data.channels, data.image_size).eval()
        teacher_name = f"{args.teacher_model} (random init)"
        cmatrix = CMatrix.from_logits(torch.zeros(data.num_classes, data.num_classes - 1), data.class_names, alpha=DEFAULT_ALPHA)

    def module_for(mode: str) -> TrainModule:
        set_seed(0)  # the same initial student in every mode
        student = build_model(args.student, data.num_classes, data.channels, data.image_size)
        given = {"plain": {}, "proxy": {"cmatrix": cmatrix}, "kd": {"teacher": teacher}}[mode]
        return TrainModule(student, build_method(METHOD[mode], data.num_classes, data.class_names, **given))

    settings = Settings(epochs=1, batch_size=args.batch_size, lr=0.05, weight_decay=5e-4, seed=0, max_steps=args.steps)

    def step_seconds(mode: str) -> tuple[float, float | None]:
        result = fit(module_for(mode), data, settings, accelerator, evaluate=False, desc=mode)
        return result.train_seconds / result.steps, result.method_metrics.get("teacher_forward_share")

    print(f"{data.describe()} | student {args.student} | teacher {teacher_name} | {args.steps} steps x {args.repeats} repeats", flush=True)
    for mode in MODES:  # warm-up round, not recorded
        step_seconds(mode)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    shares: list[float] = []
    for repeat in range(args.repeats):
        order = MODES[repeat % 3:] + MODES[: repeat % 3]
        for mode in order:
            seconds, share = step_seconds(mode)
            times[mode].append(seconds)
            if share is not None:
                shares.append(share)
        print(f"repeat {repeat + 1}: " + "  ".join(f"{m} {times[m][-1] * 1000:.1f} ms" for m in MODES), flush=True)

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b])]

    def summary(values: list[float]) -> dict[str, float]:
        return {"min": min(values), "median": statistics.median(values)}

    report = {
        "command": " ".join(["python", "benchmarks/student_modes.py", *sys.argv[1:]]),
        "dataset": data.describe(),
        "student": args.student,
        "student_parameters": count_parameters(module_for("plain").net),
        "teacher": teacher_name,
        "teacher_parameters": count_parameters(teacher),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "device": str(accelerator.device),
        "mixed_precision": args.mixed_precision,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "step_seconds": {mode: {"all": times[mode], **summary(times[mode])} for mode in MODES},
        "ratio_proxy_over_plain": {"all": ratio("proxy", "plain"), **summary(ratio("proxy", "plain"))},
        "ratio_kd_over_proxy": {"all": ratio("kd", "proxy"), **summary(ratio("kd", "proxy"))},
        "kd_teacher_forward_share": summary(shares),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"student_modes_{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    rp, rk = report["ratio_proxy_over_plain"], report["ratio_kd_over_proxy"]
    lines = [
        f"# Student modes, step time side by side ({args.name})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['dataset']}; student {args.student} ({report['student_parameters']:,} params), "
        f"teacher {teacher_name} ({report['teacher_parameters']:,} params); batch {args.batch_size}, "
        f"{args.steps} steps per run, {args.repeats} repeats after a warm-up round; {report['device']}, "
        f"{report['machine']}, mixed precision {args.mixed_precision}.",
        "",
        "| mode | step ms (min) | step ms (median) |",
        "|---|---|---|",
        *[f"| {m} | {min(times[m]) * 1000:.1f} | {statistics.median(times[m]) * 1000:.1f} |" for m in MODES],
        "",
        "| ratio (per repeat) | min | median |",
        "|---|---|---|",
        f"| proxy / plain (goal <= 1.03) | {rp['min']:.3f} | {rp['median']:.3f} |",
        f"| kd / proxy | {rk['min']:.3f} | {rk['median']:.3f} |",
        "",
        f"KD: teacher forward share of step time, median {report['kd_teacher_forward_share']['median']:.0%} "
        f"(min {report['kd_teacher_forward_share']['min']:.0%}).",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
