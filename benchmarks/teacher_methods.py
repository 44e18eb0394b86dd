"""1-hot vs label smoothing vs LS++ teachers, several seeds, one command.

    python benchmarks/teacher_methods.py [--dataset digits] [--seeds 0 1 2] [--epochs 30] [-- KD FLAGS]

Each run is a real `kd train-teacher` run. Writes benchmarks/results/teacher_methods_<dataset>.json
and .md: last-epoch test top-1, NLL, ECE and mean confidence as mean +- std over seeds, and
training time per run.
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
    parser.add_argument("--methods", nargs="+", default=["onehot", "ls", "lspp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further `kd train-teacher` flags, after --")
    args = parser.parse_args()
    extra = [flag for flag in args.extra if flag != "--"]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            common = ["train-teacher", "--dataset", args.dataset, "--method", method, "--epochs", str(args.epochs), *extra]
            runs = [run_kd([*common, "--seed", str(seed)], Path(tmp) / f"{method}-{seed}") for seed in args.seeds]
            rows.append(summarise(method, args.seeds, runs))
    command = " ".join(["python", "benchmarks/teacher_methods.py", *sys.argv[1:]])
    title = f"Teacher methods on {args.dataset} ({args.epochs} epochs, seeds {' '.join(map(str, args.seeds))})"
    write_report(args.results_dir / f"teacher_methods_{args.dataset}", title, command, rows,
                 {"dataset": args.dataset, "epochs": args.epochs, "extra_flags": extra})


if __name__ == "__main__":
    main()
