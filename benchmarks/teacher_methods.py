"""1-hot vs label smoothing vs LS++ teachers, several seeds, one command.

    python benchmarks/teacher_methods.py [--dataset digits] [--seeds 0 1 2] [--epochs 30]

Each run is a real `kd train-teacher` run (the same code path users get). Writes
benchmarks/results/teacher_methods_<dataset>.json and .md: last-epoch test top-1, NLL, ECE and
mean confidence as mean +- std over seeds, and training time per run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KD = str(Path(sys.executable).with_name("kd"))
METRICS = ("test_top1", "test_nll", "test_ece", "test_mean_confidence", "train_seconds")


def run(dataset: str, method: str, seed: int, epochs: int, extra: list[str], workdir: Path) -> dict:
    out = workdir / f"{method}-{seed}"
    command = [KD, "train-teacher", "--dataset", dataset, "--method", method, "--seed", str(seed),
               "--epochs", str(epochs), "--out", str(out), *extra]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


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
            runs = [run(args.dataset, method, seed, args.epochs, extra, Path(tmp)) for seed in args.seeds]
            summary = {name: mean_std([r[name] for r in runs]) for name in METRICS}
            rows.append({"method": method, "seeds": args.seeds, "runs": [{k: r[k] for k in METRICS} for r in runs], "summary": summary})
            print(f"{method}: top-1 {summary['test_top1'][0]:.4f} +- {summary['test_top1'][1]:.4f}", flush=True)

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"teacher_methods_{args.dataset}"
    command = " ".join(["python", "benchmarks/teacher_methods.py", *sys.argv[1:]])
    report = {"command": command, "dataset": args.dataset, "epochs": args.epochs, "extra_flags": extra,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
              "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Teacher methods on {args.dataset} ({args.epochs} epochs, seeds {' '.join(map(str, args.seeds))})",
        "",
        f"Command: `{command}`. Last-epoch test metrics, mean +- std over seeds.",
        "",
        "| method | top-1 | NLL | ECE | mean confidence | train s (min / median) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["summary"]
        times = [r["train_seconds"] for r in row["runs"]]
        lines.append(
            f"| {row['method']} | {s['test_top1'][0]:.4f} +- {s['test_top1'][1]:.4f} | {s['test_nll'][0]:.4f} +- {s['test_nll'][1]:.4f} "
            f"| {s['test_ece'][0]:.4f} +- {s['test_ece'][1]:.4f} | {s['test_mean_confidence'][0]:.4f} "
            f"| {min(times):.1f} / {statistics.median(times):.1f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
