"""Proxy teacher vs classic KD vs plain student: accuracy and calibration over several seeds.

    python benchmarks/student_accuracy.py [--dataset digits] [--student tiny_cnn] [--seeds 0 1 2] [-- KD FLAGS]

Trains one LS++ teacher (default model, seed 0), then for each seed the same student three
ways with real `kd distill` runs: `--proxy` its cmatrix.safetensors, `--teacher` its run
directory, and plain 1-hot. Writes benchmarks/results/student_accuracy_<dataset>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _seeds import RESULTS, run_kd, summarise, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--teacher-model", default="small_cnn")
    parser.add_argument("--student", default="tiny_cnn")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further flags for every `kd` run, after --")
    args = parser.parse_args()
    extra = [flag for flag in args.extra if flag != "--"]

    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        teacher_metrics = run_kd(["train-teacher", "--dataset", args.dataset, "--model", args.teacher_model, *extra], teacher)
        variants = {
            "proxy (PT-LS++)": ["--proxy", str(teacher / "cmatrix.safetensors")],
            "kd (Hinton)": ["--teacher", str(teacher)],
            "plain 1-hot": [],
        }
        rows = []
        for name, flags in variants.items():
            common = ["distill", "--dataset", args.dataset, "--model", args.student, *flags, *extra]
            runs = [run_kd([*common, "--seed", str(seed)], Path(tmp) / f"{len(rows)}-{seed}") for seed in args.seeds]
            rows.append(summarise(name, args.seeds, runs))
    command = " ".join(["python", "benchmarks/student_accuracy.py", *sys.argv[1:]])
    title = (f"Students on {args.dataset}: {args.student} from a {args.teacher_model} LS++ teacher "
             f"(top-1 {teacher_metrics['test_top1']:.4f}), seeds {' '.join(map(str, args.seeds))}")
    write_report(args.results_dir / f"student_accuracy_{args.dataset}", title, command, rows,
                 {"dataset": args.dataset, "student": args.student, "teacher_model": args.teacher_model,
                  "teacher_top1": teacher_metrics["test_top1"], "extra_flags": extra})


if __name__ == "__main__":
    main()
