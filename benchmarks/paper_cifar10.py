"""The paper's CIFAR-10 experiments with its AlexNet (and LeNet students), one command each.

    python benchmarks/paper_cifar10.py table3 --regime small   # Table 3: label regularisers
    python benchmarks/paper_cifar10.py table3 --regime full
    python benchmarks/paper_cifar10.py table3 --regime paper   # the paper's recipe: 300 epochs on all the data (a GPU's work)
    python benchmarks/paper_cifar10.py fig3                     # Figure 3: the learned C-matrix (needs table3 small, lspp, seed 0)
    python benchmarks/paper_cifar10.py table5                   # Table 5 / Figure 6: the C-loss ablation, small data
    python benchmarks/paper_cifar10.py table6                   # Table 6: students of AlexNet teachers, small data
    python benchmarks/paper_cifar10.py table6kd                 # Table 6 extended: per-sample KD of the field, stored soft labels
    python benchmarks/paper_cifar10.py table7                   # Table 7: with cutout / mixup / cutmix / randaugment, small data
    python benchmarks/paper_cifar10.py all                      # everything above, in that order
    python benchmarks/paper_cifar10.py readme                   # the tables in the README and docs, from the results files
    options: [--seeds 0 1 2] [--methods ...] [--runs-dir runs/paper] [--data-dir .data/cifar10-jpeg]

Regimes (about the same compute; the paper ran 300 epochs on all the data):
  small: 500 training images per class (`--train-per-class 500`, picked with the run's seed;
         the whole test set), 60 epochs: 1-hot training overfits and turns over-confident;
  full:  all 50,000 training images, 10 epochs: the network has not yet overfit;
  paper: all 50,000 training images, 300 epochs, as the paper: 4-8 hours a run on a 2-core CPU, so a
         GPU's work. The runs fit side by side on one GPU: start one runner per method (`--methods
         lspp`, ...) at once.

Every run is a real `kd` command (printed before it starts) writing into --runs-dir (ignored
by git). A run whose metrics.json exists is skipped, and an interrupted one resumes from its
last checkpoint, so a table can be completed over several sittings; a table's results files are
written before the first run trains and rewritten after every run, each time from every finished
run of the table (a sitting stopped midway leaves a whole table), each cell with its seed count. Metrics are
the last epoch's, on the whole CIFAR-10 test set. Writes benchmarks/results/paper_<name>.json
and .md, and the figures under docs/images/.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seeds import COLUMNS, KD, RESULTS, cell, markdown_table, table_metrics  # noqa: E402
from student_modes import ROOT, ensure_cifar10  # noqa: E402

from lspp_kd.cli.main import run_in_process  # noqa: E402
from kd.io import write_text_atomic  # noqa: E402

IMAGES = ROOT / "docs" / "images"
REGIMES = {"small": ["--train-per-class", "500", "--epochs", "60"], "full": ["--epochs", "10"], "paper": ["--epochs", "300"]}
REGIME_TITLES = {"small": "small data", "full": "full data", "paper": "the paper's recipe"}
COMMON = ["--dataset", "imagefolder", "--batch-size", "128", "--lr", "0.05", "--checkpoint-every", "5"]
TABLE3_METHODS = ["onehot", "ls", "tfkd", "ols", "lspp", "zipf", "focal", "mbls"]
AUGMENTS = {"cutout": "crop,flip,cutout", "mixup": "crop,flip,mixup", "cutmix": "crop,flip,cutmix", "randaugment": "crop,flip,randaugment"}
ALL_SEEDS = (0, 1, 2)  # tables show every finished run of these; --seeds says which may be trained now
ARGS: argparse.Namespace  # the command line, set by main()
FIRST_COLUMN = {"table3_small": "method", "table3_full": "method", "table3_paper": "method", "table5": "--c-loss",
                "table6": "student (LeNet, 62k params)", "table6kd": "student (LeNet) of the 1-hot AlexNet", "table7": "method + augmentation"}
README = ROOT / "README.md"
# Tables whose every run trained alone on the machine: the docs show their train-time column.
QUIET_SITTINGS = ("table6kd",)


def documents(root: Path = ROOT) -> list[Path]:
    """The files that may hold `<!-- paper:NAME -->` blocks: README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = ["--data-dir", str(ensure_cifar10(args.data_dir))]
        self.trains = not args.report_only
        self.after_run: Callable[[], None] = lambda: None  # called after each run this runner trains

    def reporter(self) -> Runner:
        """A runner over the same runs that trains none: it rebuilds a table from every finished run."""
        other = copy.copy(self)
        other.trains = False
        return other

    def run(self, command: str, out: Path, flags: list[str], seed: int, train: bool = True) -> dict | None:
        """metrics.json of the run in `out`, training it first unless it finished before (or its seed
        was not asked for: then tables still show it if an earlier sitting made it); None if it failed."""
        if (out / "metrics.json").exists():
            return json.loads((out / "metrics.json").read_text())
        if seed not in self.args.seeds or not train or not self.trains:
            return None
        if not self.train(command, out, flags):
            return None
        self.after_run()
        return json.loads((out / "metrics.json").read_text())

    def train(self, command: str, out: Path, flags: list[str]) -> bool:
        """One real `kd` run into `out` (resumed from its last checkpoint if it has one); whether it finished."""
        resume = ["--resume"] if any((out / "checkpoints").glob("step-*")) else (["--overwrite"] if out.exists() else [])
        argv = [KD, command, *COMMON, *self.data, *flags, "--out", str(out), *resume]
        print("$ " + " ".join(argv[1:]), flush=True)
        result = run_in_process(argv[1:]) if self.args.smoke else subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            print(f"  failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}", flush=True)
        return result.returncode == 0

    def once(self, argv: list[str], timed: Path | None = None) -> bool:
        """A `kd` command that makes a file (a C-matrix, soft labels); `timed`: a JSON file for its wall-clock seconds."""
        print("$ kd " + " ".join(argv), flush=True)
        started = time.perf_counter()
        result = run_in_process(argv) if self.args.smoke else subprocess.run([KD, *argv], stdout=subprocess.DEVNULL)
        if result.returncode != 0:
            print("  failed: kd " + " ".join(argv), flush=True)
        elif timed is not None:
            write_text_atomic(timed, json.dumps({"command": "kd " + " ".join(argv), "seconds": time.perf_counter() - started}) + "\n")
        return result.returncode == 0

    def teacher(self, regime: str, method: str, seed: int, extra: tuple[str, ...] = (), tag: str = "",
                train: bool = True) -> tuple[Path, dict | None]:
        out = self.args.runs_dir / f"{regime}" / f"{method}{tag}-s{seed}"
        flags = ["--model", "alexnet", "--method", method, "--seed", str(seed), *REGIMES[regime], *extra]
        return out, self.run("train-teacher", out, flags, seed, train)


def write(name: str, title: str, lines: list[str], data: dict) -> None:
    results = ARGS.results_dir
    results.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/paper_cifar10.py", *sys.argv[1:]])
    # Atomic: runners started side by side (one per method on a GPU) rewrite the same files.
    write_text_atomic(results / f"paper_{name}.json", json.dumps({"command": command, **data}, indent=2) + "\n")
    write_text_atomic(results / f"paper_{name}.md", "\n".join([f"# {title}", "", f"Command: `{command}`", "", *lines]) + "\n")
    print(f"wrote {results / f'paper_{name}.md'}", flush=True)


def entropy_table(entropy: dict[str, list[float]]) -> list[str]:
    lines = ["| --c-loss | mean normalised row entropy of C (1 = uniform, 0 = one class) |", "|---|---|"]
    return lines + [f"| {variant} | {cell(values, 3)} |" for variant, values in entropy.items()]


def table_command(name: str) -> str:
    """The command that makes the results file paper_<name>.json."""
    experiment, _, regime = name.partition("_")
    return f"python benchmarks/paper_cifar10.py {experiment}" + (f" --regime {regime}" if regime else "")


def readme_blocks(results: Path) -> dict[str, str]:
    """The README's and docs' copy of each table, made from its results file (without the train-time column,
    but for the tables of `QUIET_SITTINGS`: the others' times were taken while other work shared the cores);
    for a table not run yet, its command."""
    blocks = {}
    for name, first in FIRST_COLUMN.items():
        path = results / f"paper_{name}.json"
        if not path.exists():
            blocks[name] = f"\nNot run yet: `{table_command(name)}`.\n"
            continue
        data = json.loads(path.read_text())
        lines = markdown_table(data["rows"], first, COLUMNS if name in QUIET_SITTINGS else COLUMNS[:-1])
        if name == "table5":
            lines += ["", *entropy_table(data["entropy"])]
        blocks[name] = "\n".join(["", *lines, ""])  # blank lines: the markers are not part of the table
    return blocks


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- paper:{name} -->\n)(.*?)(\n<!-- /paper:{name} -->)", re.DOTALL)


def update_readme(readme: Path | list[Path], results: Path) -> list[str]:
    """Rewrite each `<!-- paper:NAME -->` block, wherever it is (README.md, docs/*.md: a block may
    be in several files), from the results; the names rewritten. `readme` is one file or a list."""
    blocks, done = readme_blocks(results), []
    for path in [readme] if isinstance(readme, Path) else readme:
        text = original = path.read_text()
        for name, block in blocks.items():
            text, found = block_pattern(name).subn(lambda m: m.group(1) + block + m.group(3), text)
            if found and name not in done:
                done.append(name)
        if text != original:
            write_text_atomic(path, text)
    return [name for name in blocks if name in done]


def table3(runner: Runner, regime: str) -> None:
    rows: dict[str, list[dict]] = {}
    for seed in ALL_SEEDS:  # seed-major: a first seed of every method comes before any second seed
        for method in TABLE3_METHODS:
            asked = not runner.args.methods or method in runner.args.methods
            _, metrics = runner.teacher(regime, method, seed, train=asked)
            rows.setdefault(method, [])
            if metrics is not None:
                rows[method].append(table_metrics(metrics))
    spec = " ".join(REGIMES[regime])
    write(f"table3_{regime}", f"Table 3 on CIFAR-10, paper's AlexNet, {REGIME_TITLES[regime]} ({spec})",
          markdown_table(rows, FIRST_COLUMN[f"table3_{regime}"]), {"regime": regime, "rows": rows})


def fig3(runner: Runner) -> None:
    import torch

    from kd.cmatrix.artifact import load_cmatrix
    from kd.reports.plots import plot_cmatrix

    out, metrics = runner.teacher("small", "lspp", 0)
    if metrics is None:
        return
    cm = load_cmatrix(out / "cmatrix.safetensors")
    plot_cmatrix(cm, ARGS.images_dir / "fig3_cifar10_lspp_cmatrix.png", title="LS++ C-matrix, CIFAR-10, AlexNet, small data, seed 0")
    top = {name: cm.class_names[int(torch.argmax(row))] for name, row in zip(cm.class_names, cm.probs)}
    mutual = sorted({tuple(sorted((a, b))) for a, b in top.items() if top[b] == a})
    lines = ["![C-matrix](../../docs/images/fig3_cifar10_lspp_cmatrix.png)", "", "| class | top neighbour | C |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {float(cm.probs[cm.class_names.index(a), cm.class_names.index(b)]):.3f} |" for a, b in top.items()]
    lines += ["", "Mutual top neighbours: " + (", ".join(f"{a} <-> {b}" for a, b in mutual) or "none")]
    write("fig3", "Figure 3: the LS++ C-matrix learned on CIFAR-10 (AlexNet, small data, seed 0)", lines,
          {"top_neighbour": top, "mutual": mutual, "run": str(out)})


def table5(runner: Runner) -> None:
    from kd.cmatrix.artifact import load_cmatrix, normalised_row_entropy
    from kd.reports.plots import plot_cmatrix

    rows, entropy = {}, {}
    for seed in ALL_SEEDS:
        for variant in ("detached", "ce", "sce"):
            extra, tag = (("--c-loss", variant), f"-{variant}") if variant != "detached" else ((), "")
            out, metrics = runner.teacher("small", "lspp", seed, extra, tag)
            rows.setdefault(variant, [])
            entropy.setdefault(variant, [])
            if metrics is None:
                continue
            rows[variant].append(table_metrics(metrics))
            cm = load_cmatrix(out / "cmatrix.safetensors")
            entropy[variant].append(float(normalised_row_entropy(cm.probs).mean()))
            if seed == 0:
                plot_cmatrix(cm, ARGS.images_dir / f"fig6_cifar10_c_loss_{variant}.png", title=f"--c-loss {variant}")
    lines = [*markdown_table(rows, FIRST_COLUMN["table5"]), "", *entropy_table(entropy)]
    lines += ["", " ".join(f"![{v}](../../docs/images/fig6_cifar10_c_loss_{v}.png)" for v in rows)]
    write("table5", "Table 5 / Figure 6: how C is trained (LS++, CIFAR-10, AlexNet, small data)", lines,
          {"rows": rows, "entropy": entropy})


def table6(runner: Runner) -> None:
    rows: dict[str, list[dict]] = {}
    for seed in ALL_SEEDS:
        teachers = {m: runner.teacher("small", m, seed)[0] for m in ("onehot", "ls", "lspp", "ols")}
        posthoc = runner.args.runs_dir / "small" / f"posthoc-onehot-s{seed}.safetensors"
        if not posthoc.exists() and (teachers["onehot"] / "metrics.json").exists() and runner.trains:
            # Over the teacher's own training images (the run's --train-per-class subset).
            runner.once(["cmatrix", "from-teacher", str(teachers["onehot"]), "--out", str(posthoc)])
        students = {  # slug: (row name, what it is given)
            "kd-onehot": ("KD from 1-hot AlexNet", ["--teacher", teachers["onehot"]]),
            "kd-ls": ("KD from LS AlexNet", ["--teacher", teachers["ls"]]),
            "kd-lspp": ("KD from LS++ AlexNet", ["--teacher", teachers["lspp"]]),
            "proxy-lspp": ("proxy: LS++ C-matrix", ["--proxy", teachers["lspp"] / "cmatrix.safetensors"]),
            "proxy-ols": ("proxy: OLS matrix", ["--proxy", teachers["ols"] / "cmatrix.safetensors"]),
            "proxy-posthoc": ("proxy: post-hoc C of the 1-hot AlexNet", ["--proxy", posthoc]),
            "plain": ("plain 1-hot", []),
        }
        for slug, (name, given) in students.items():
            rows.setdefault(name, [])
            if given and not Path(given[1]).exists():
                continue  # its teacher failed
            out = runner.args.runs_dir / "small-students" / f"{slug}-s{seed}"
            metrics = runner.run("distill", out, ["--model", "lenet", "--seed", str(seed), *REGIMES["small"], *map(str, given)], seed)
            if metrics is not None:
                rows[name].append(table_metrics(metrics))
    write("table6", "Table 6: the paper's LeNet taught by AlexNet teachers (CIFAR-10, small data)",
          markdown_table(rows, FIRST_COLUMN["table6"]), {"rows": rows})

# Table 6 extended: every student learns from the same seed-matched 1-hot AlexNet (the usual KD
# teacher), by what it is given. slug: (row, method flags, source: None, "proxy", "stored" or "live").
TABLE6KD_ROWS = {
    "plain": ("plain 1-hot (no teacher)", [], None),
    "proxy-posthoc": ("proxy: post-hoc C-matrix of the teacher", [], "proxy"),
    "stored-kd": ("KD from stored soft labels (one teacher pass)", ["--method", "kd"], "stored"),
    "kd": ("KD (Hinton), live teacher", ["--method", "kd"], "live"),
    "kd-logit-std": ("KD + logit standardisation (T 2, kd weight 9)", ["--method", "kd", "--logit-std", "--temperature", "2", "--kd-weight", "9"], "live"),
    "dkd": ("DKD (T 4, alpha 1, beta 8, warm-up 20 epochs)", ["--method", "dkd"], "live"),
    "dist": ("DIST (tau 4, beta = gamma = 2)", ["--method", "dist"], "live"),
}


def table6kd(runner: Runner) -> None:
    """The field's per-sample KD and stored soft labels beside the proxy teacher, from one teacher per seed.

    The stored row's time adds the teacher's one pass (`kd soft-labels`, wall clock with start-up).
    """
    rows: dict[str, list[dict]] = {}
    for seed in ALL_SEEDS:
        teacher, _ = runner.teacher("small", "onehot", seed)
        files = runner.args.runs_dir / "small"
        posthoc, stored = files / f"posthoc-onehot-s{seed}.safetensors", files / f"soft-labels-onehot-s{seed}.safetensors"
        if (teacher / "metrics.json").exists() and runner.trains and seed in runner.args.seeds:
            if not posthoc.exists():  # over the teacher's own training images (the run's --train-per-class subset)
                runner.once(["cmatrix", "from-teacher", str(teacher), "--out", str(posthoc)])
            if not stored.exists():
                runner.once(["soft-labels", str(teacher), "--out", str(stored)], timed=stored.with_suffix(".json"))
        sources = {None: [], "proxy": ["--proxy", posthoc], "stored": ["--soft-labels", stored], "live": ["--teacher", teacher]}
        for slug, (name, flags, source) in TABLE6KD_ROWS.items():
            rows.setdefault(name, [])
            given = sources[source]
            if given and not Path(given[1]).exists():
                continue  # its teacher failed
            out = runner.args.runs_dir / "small-students-kd" / f"{slug}-s{seed}"
            metrics = runner.run("distill", out, ["--model", "lenet", "--seed", str(seed), *REGIMES["small"], *flags, *map(str, given)], seed)
            if metrics is None:
                continue
            if source == "stored" and stored.with_suffix(".json").exists():
                metrics = {**metrics, "train_seconds": metrics["train_seconds"] + json.loads(stored.with_suffix(".json").read_text())["seconds"]}
            rows[name].append(table_metrics(metrics))
    write("table6kd", "Table 6 extended: the LeNet student of a 1-hot AlexNet by what it is given (CIFAR-10, small data)",
          markdown_table(rows, FIRST_COLUMN["table6kd"]), {"rows": rows})


def table7(runner: Runner) -> None:
    rows: dict[str, list[dict]] = {}
    for seed in ALL_SEEDS:
        for augment, spec in AUGMENTS.items():
            for method in ("onehot", "lspp"):
                _, metrics = runner.teacher("small", method, seed, ("--augment", spec), f"-{augment}")
                rows.setdefault(f"{method} + {augment}", [])
                if metrics is not None:
                    rows[f"{method} + {augment}"].append(table_metrics(metrics))
    write("table7", "Table 7: LS++ with data augmentation (CIFAR-10, AlexNet, small data; crop,flip plus the named one)",
          markdown_table(rows, FIRST_COLUMN["table7"]), {"rows": rows})


def sitting(runner: Runner, table: Callable[..., None], *args: str) -> None:
    """Train what `table` still needs, keeping its results files whole: written from every finished
    run before the first run trains and again after each one."""
    reporter = runner.reporter()
    runner.after_run = lambda: table(reporter, *args)
    runner.after_run()
    if runner.trains:
        table(runner, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["table3", "fig3", "table5", "table6", "table6kd", "table7", "all", "readme"])
    parser.add_argument("--regime", choices=list(REGIMES), default="small")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(ALL_SEEDS), help="the seeds to train now (of 0 1 2)")
    parser.add_argument("--methods", nargs="+", help=f"table3: the methods to train now (default: {' '.join(TABLE3_METHODS)})")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "paper")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".data" / "cifar10-jpeg")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--images-dir", type=Path, default=IMAGES)
    parser.add_argument("--report-only", action="store_true", help="train nothing: rebuild the tables from finished runs")
    parser.add_argument("--smoke", type=int, metavar="N",
                        help="a smoke test: N images per class and 1 epoch in every regime, 2 steps per run")
    args = parser.parse_args()
    if args.smoke:
        for flags in REGIMES.values():
            flags[:] = ["--train-per-class", str(args.smoke), "--epochs", "1", "--max-steps", "2"]
    global ARGS
    ARGS = args
    if args.experiment == "readme":
        files = documents()
        print("rewrote the tables in README.md and docs/*.md: " + ", ".join(update_readme(files, args.results_dir)))
        return
    args.images_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(args)
    if args.experiment in ("table3", "all"):
        sitting(runner, table3, args.regime)
    if args.experiment in ("fig3", "all"):
        sitting(runner, fig3)
    if args.experiment in ("table5", "all"):
        sitting(runner, table5)
    if args.experiment in ("table6", "all"):
        sitting(runner, table6)
    if args.experiment in ("table6kd", "all"):
        sitting(runner, table6kd)
    if args.experiment in ("table7", "all"):
        sitting(runner, table7)


if __name__ == "__main__":
    main()
