"""Transfer: pretrain on five CIFAR-10 classes, fine-tune on the other five with few images, distill.

    python benchmarks/transfer_cifar10.py [--seeds 0 1 2] [--per-class 100] [--runs-dir runs/transfer]

Offline, from the project's CIFAR-10 copy (../shared/data, unpacked into .data/):

1. **Pretrain** the paper's AlexNet (1-hot) on airplane, automobile, bird, cat, deer (1,000 training
   images each, 30 epochs, seed 0): the "published checkpoint" every later run starts from.
2. **Fine-tune** on dog, frog, horse, ship, truck with `--per-class` images each (picked with the
   run's seed; the whole test split of those classes), 30 epochs, from the pretrained weights
   (`--pretrained-path`: the classifier is re-initialised, the class names differ) and from
   scratch, with 1-hot and LS++, over the seeds. Same recipe for all four (lr 0.02, batch 64).
3. **Distill** the paper's LeNet from the fine-tuned LS++ teacher of each seed: by proxy (its
   C-matrix alone), by KD (the live teacher) and plain, on the same few images.

Every run is a real `kd` command (printed) into --runs-dir (ignored by git); a finished run is
skipped and an interrupted one resumes, so the table can be completed over sittings. The table is
rewritten after every run from every finished run. Metrics are the last epoch's, on the five target
classes' 5,000 test images. Writes benchmarks/results/transfer_cifar10.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seeds import KD, RESULTS, markdown_table, table_metrics  # noqa: E402
from student_modes import ROOT, ensure_cifar10  # noqa: E402

from kd.io import write_text_atomic  # noqa: E402

SOURCE = ("airplane", "automobile", "bird", "cat", "deer")
TARGET = ("dog", "frog", "horse", "ship", "truck")
COMMON = ["--dataset", "imagefolder", "--batch-size", "64", "--checkpoint-every", "10"]
PRETRAIN = ["--model", "alexnet", "--method", "onehot", "--train-per-class", "1000", "--epochs", "30", "--lr", "0.05", "--seed", "0"]
FINETUNE = ["--model", "alexnet", "--epochs", "30", "--lr", "0.02"]
STUDENT = ["--model", "lenet", "--epochs", "30", "--lr", "0.02"]
ALL_SEEDS = (0, 1, 2)


def class_subset(cifar: Path, classes: tuple[str, ...], dest: Path) -> Path:
    """An ImageFolder tree of `classes` only: hard links to the CIFAR-10 copy's files (no second copy)."""
    if (dest / "done").exists():
        return dest
    for split in ("train", "test"):
        for name in classes:
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for file in (cifar / split / name).iterdir():
                if not (folder / file.name).exists():
                    os.link(file, folder / file.name)
    (dest / "done").write_text("")
    return dest


class Runs:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: dict[str, list[dict]] = {}
        self.trains = not args.report_only

    def run(self, command: str, out: Path, data: Path, flags: list[str], seed: int | None) -> dict | None:
        """The run's metrics.json, training it first if it is not finished (and its seed is asked for)."""
        if (out / "metrics.json").exists():
            return json.loads((out / "metrics.json").read_text())
        if not self.trains or (seed is not None and seed not in self.args.seeds):
            return None
        resume = ["--resume"] if any((out / "checkpoints").glob("step-*")) else (["--overwrite"] if out.exists() else [])
        argv = [command, *COMMON, "--data-dir", str(data), *flags, "--out", str(out), *resume]
        print("$ kd " + " ".join(argv), flush=True)
        result = subprocess.run([KD, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            print(f"  failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}", flush=True)
            return None
        return json.loads((out / "metrics.json").read_text())

    def add(self, row: str, metrics: dict | None) -> None:
        self.rows.setdefault(row, [])
        if metrics is not None:
            self.rows[row].append(table_metrics(metrics))
        self.write()

    def write(self) -> None:
        command = " ".join(["python", "benchmarks/transfer_cifar10.py", *sys.argv[1:]])
        results = self.args.results_dir
        results.mkdir(parents=True, exist_ok=True)
        lines = [
            "# Transfer: AlexNet pretrained on five CIFAR-10 classes, fine-tuned on the other five, and its students", "",
            f"Command: `{command}`", "",
            f"Pretrained on {', '.join(SOURCE)} (1,000 images each, 30 epochs, 1-hot); fine-tuned and distilled on "
            f"{', '.join(TARGET)} with {self.args.per_class} training images per class, 30 epochs, lr 0.02; "
            "last-epoch metrics on the 5,000 test images of those classes.", "",
            *markdown_table(self.rows, "run"),
        ]
        write_text_atomic(results / "transfer_cifar10.md", "\n".join(lines) + "\n")
        write_text_atomic(results / "transfer_cifar10.json", json.dumps({"command": command, "rows": self.rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(ALL_SEEDS), help="the seeds to train now (of 0 1 2)")
    parser.add_argument("--per-class", type=int, default=100, help="fine-tuning images per target class")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "transfer")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "cifar10-jpeg")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="train nothing: rebuild the table from finished runs")
    parser.add_argument("--smoke", action="store_true", help="2 steps per run, 10 images per class (a test of the runner)")
    args = parser.parse_args()
    if args.smoke:
        for flags in (PRETRAIN, FINETUNE, STUDENT):
            flags += ["--max-steps", "2"]
        PRETRAIN[PRETRAIN.index("--train-per-class") + 1] = "10"
        args.per_class = 10
    cifar = ensure_cifar10(args.data_dir)
    source = class_subset(cifar, SOURCE, args.runs_dir / "data" / "source5")
    target = class_subset(cifar, TARGET, args.runs_dir / "data" / "target5")
    runs, few = Runs(args), ["--train-per-class", str(args.per_class)]

    pretrained = args.runs_dir / "pretrain-source5"
    runs.run("train-teacher", pretrained, source, PRETRAIN, seed=None)
    weights = pretrained / "model.safetensors"
    for seed in ALL_SEEDS:
        teachers = {}
        for method in ("onehot", "lspp"):
            for start, given in (("pretrained", ["--pretrained-path", str(weights)]), ("scratch", [])):
                if given and not weights.exists():
                    continue
                out = args.runs_dir / f"{method}-{start}-s{seed}"
                metrics = runs.run("train-teacher", out, target, [*FINETUNE, *few, "--method", method, "--seed", str(seed), *given], seed)
                runs.add(f"teacher {method}, {'fine-tuned from the pretrained AlexNet' if given else 'from scratch'}", metrics)
                teachers[(method, start)] = out
        teacher = teachers.get(("lspp", "pretrained"))
        students = {
            "proxy": ("LeNet student: proxy (the fine-tuned LS++ teacher's C-matrix)", ["--proxy", str(teacher / "cmatrix.safetensors")] if teacher else None),
            "kd": ("LeNet student: KD (the fine-tuned LS++ teacher, live)", ["--teacher", str(teacher)] if teacher else None),
            "plain": ("LeNet student: plain 1-hot", []),
        }
        for slug, (row, given) in students.items():
            if given is None or (given and not Path(given[1]).exists()):
                runs.add(row, None)
                continue
            out = args.runs_dir / f"student-{slug}-s{seed}"
            runs.add(row, runs.run("distill", out, target, [*STUDENT, *few, "--seed", str(seed), *given], seed))
    print(f"wrote {args.results_dir / 'transfer_cifar10.md'}", flush=True)


if __name__ == "__main__":
    main()
