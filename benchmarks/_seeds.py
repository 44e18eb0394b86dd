"""Shared by the accuracy benchmarks: run `kd` variants over seeds, summarise, write JSON + markdown."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KD = str(Path(sys.executable).with_name("kd"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for `cli` when run as a script

# The columns of every accuracy table: (title, metrics.json key, digits); train seconds are a timing,
# so they are shown as min / median over the seeds, the others as mean +- std.
COLUMNS = (("top-1", "test_top1", 4), ("NLL", "test_nll", 3), ("ECE", "test_ece", 3),
           ("mean conf", "test_mean_confidence", 3), ("train s (min / median)", "train_seconds", 0))
METRICS = tuple(key for _, key, _ in COLUMNS)  # what a run contributes to a table


def run_kd(args: list[str], out: Path) -> dict:
    """One real `kd` run, through the console script's own entry point in this process (no
    interpreter start-up per run); its metrics.json. A failed run stops the benchmark with its error line."""
    from lspp_kd.cli.main import run_in_process

    result = run_in_process([*args, "--out", str(out)])
    if result.returncode != 0:
        raise SystemExit(f"kd {' '.join(args)}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    return json.loads((out / "metrics.json").read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(name: str, seeds: list[int], runs: list[dict]) -> dict:
    summary = {metric: mean_std([r[metric] for r in runs]) for metric in METRICS}
    print(f"{name}: top-1 {summary['test_top1'][0]:.4f} +- {summary['test_top1'][1]:.4f}", flush=True)
    return {"variant": name, "seeds": seeds, "runs": [table_metrics(r) for r in runs], "summary": summary}


def table_metrics(metrics: dict) -> dict:
    """The part of a run's metrics.json that the tables show."""
    return {key: metrics[key] for key in METRICS}


def cell(values: list[float], digits: int, timing: bool = False) -> str:
    """One table cell over seeds, with its seed count (no spread from one seed; "-" when no run finished)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    if timing:
        return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} (n={len(values)})"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} +- {std:.{digits}f} (n={len(values)})"


def markdown_table(rows: dict[str, list[dict]], first: str, columns: tuple = COLUMNS) -> list[str]:
    """A markdown table of `rows` (name -> the runs' metrics) over `columns` (of COLUMNS)."""
    lines = [f"| {first} | " + " | ".join(title for title, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, runs in rows.items():
        cells = [cell([r[key] for r in runs], digits, timing=key == "train_seconds") for _, key, digits in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_report(stem: Path, title: str, command: str, rows: list[dict], extra: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command, **extra, "machine": platform.machine(), "python": platform.python_version(), "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# {title}", "", f"Command: `{command}`. Last-epoch test metrics over seeds.", ""]
    lines += markdown_table({row["variant"]: row["runs"] for row in rows}, "variant")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
