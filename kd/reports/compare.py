"""The comparison report over run directories: one row per run, as text, markdown or CSV."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

from kd.training.rundir import METRICS_FILE, STATUS_FILE, read_run_config, read_run_json

# (column title, metrics key or None for the run name, format)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "run", "{}"),
    ("stage", "stage", "{}"),
    ("method", "method", "{}"),
    ("target source", "target_source", "{}"),
    ("model", "model", "{}"),
    ("top-1", "test_top1", "{:.4f}"),
    ("NLL", "test_nll", "{:.4f}"),
    ("ECE", "test_ece", "{:.4f}"),
    ("mean conf", "test_mean_confidence", "{:.4f}"),
    ("s/epoch", "seconds_per_epoch", "{:.2f}"),
    ("img/s", "images_per_second", "{:.0f}"),
    ("peak MB", "peak_memory_mb", "{:.0f}"),
    ("teacher fwd", "teacher_forward_share", "{:.0%}"),
    ("status", "status", "{}"),
)


def run_status(run_dir: str | os.PathLike) -> str:
    """"finished", "diverged at step S" (see status.json) or "unfinished" (killed, interrupted or running)."""
    if (Path(run_dir) / METRICS_FILE).is_file():
        return "finished"
    if (Path(run_dir) / STATUS_FILE).is_file():
        status = read_run_json(run_dir, STATUS_FILE, "")
        return f"{status.get('status', 'failed')} at step {status.get('step', '?')}"
    return "unfinished"


def compare_rows(run_dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """One dict per run with every report column (config.json fills what metrics.json lacks).

    A run without metrics.json (diverged, killed, interrupted, still running) gets a row with
    its status and no results, rather than stopping the report.
    """
    rows = []
    for run_dir in run_dirs:
        config = read_run_config(run_dir)
        status = run_status(run_dir)
        metrics = read_run_json(run_dir, METRICS_FILE, "") if status == "finished" else {"train_seconds": None}
        row = {**config, **metrics, "run": Path(run_dir).name, "status": status}
        if row.get("train_seconds") is not None:
            row.setdefault("seconds_per_epoch", row["train_seconds"] / max(row.get("epochs", 1), 1))
        rows.append(row)
    return rows


def _cells(row: dict) -> list[str]:
    cells = []
    for _, key, fmt in COLUMNS:
        value = row.get(key)
        cells.append("-" if value is None else fmt.format(value))
    return cells


def to_text(rows: list[dict]) -> str:
    table = [[title for title, _, _ in COLUMNS]] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([key for _, key, _ in COLUMNS])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row.get(key) for _, key, _ in COLUMNS])
    return buffer.getvalue()
