"""`kd cmatrix from-teacher`: estimate a C-matrix from any trained classifier's run directory."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("from-teacher")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="C-matrix file to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--dataset", default=None, help="Dataset to average over (default: the teacher's own).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Dataset root (default: the teacher's own).")
@click.option("--alpha", type=float, default=None, help="Mixing mass a recorded in the file (default: the teacher's alpha, else 0.1).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Batch size for the pass over the training split.")
def from_teacher_command(run_dir: str, out: str, overwrite: bool, dataset: str | None, data_dir: str | None,
                         alpha: float | None, batch_size: int) -> None:
    """Average a trained network's non-target predictions per class over its training set (source = posthoc)."""
    from accelerate import Accelerator

    from kd.cmatrix import CMatrix, save_cmatrix
    from kd.datasets import load_dataset
    from kd.errors import KDError
    from kd.posthoc import estimate_cmatrix
    from kd.rundir import METRICS_FILE, load_run_model, read_run_json

    if Path(out).exists() and not overwrite:
        raise KDError(f"{out} exists; pass --overwrite to replace it")
    net, config = load_run_model(run_dir)
    alpha = alpha if alpha is not None else float(config.get("alpha") or 0.1)
    if not 0.0 <= alpha < 1.0:
        raise KDError(f"--alpha must be in [0, 1), got {alpha}")
    data = load_dataset(dataset or config.get("dataset", "digits"), data_dir or config.get("data_dir"),
                        image_size=config["image_size"])
    if list(data.class_names) != list(config["class_names"]):
        raise KDError(f"the dataset's classes differ from those teacher {run_dir} was trained on")
    probs = estimate_cmatrix(net, data, batch_size, Accelerator())
    has_metrics = (Path(run_dir) / METRICS_FILE).is_file()
    teacher_top1 = read_run_json(run_dir, METRICS_FILE, "").get("test_top1") if has_metrics else None
    save_cmatrix(out, CMatrix.from_probs(
        probs, class_names=data.class_names, alpha=alpha, source="posthoc", dataset=data.name,
        teacher_model=config["model"], teacher_top1=teacher_top1,
    ))
    click.echo(f"wrote {out}: posthoc C-matrix of {config['model']} over {len(data.class_names)} classes")
