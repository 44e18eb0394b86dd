"""Figures from the command line: `kd cmatrix plot FILE --out PNG` and `kd plot RUN_DIR --out DIR`.

`cmatrix_plot_command` is registered in the `kd cmatrix` group (cli/cmatrix_commands.py);
`plot_command` is a top-level command for cli/main.py. The drawing is `kd.reports.plots`'s business;
these commands check their inputs and outputs first and report every problem in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from lspp_kd.cli.files import check_out_file, check_png_name
from kd.errors import KDError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kd.data.datasets import ImageDataset

RELIABILITY_FILE = "reliability.png"
CURVES_FILE = "curves.png"
CMATRIX_PNG = "cmatrix.png"


@click.command("plot")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(), help="PNG file to write (refused if it exists, unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file (written atomically).")
@click.option("--title", default=None, help="Figure title (default: the file's source, dataset, teacher and K).")
def cmatrix_plot_command(file: str, out: str, overwrite: bool, title: str | None) -> None:
    """Draw FILE as a heatmap like the paper's Figure 3: rows true classes, columns the others.

    The diagonal is blank (it is 0 by construction). Up to 20 classes every cell shows its
    probability; with more, the figure grows and the class names get small and thinned.
    """
    from lspp_kd.cli.cmatrix_display import summary_line
    from kd.cmatrix.artifact import load_cmatrix
    from kd.reports.plots import plot_cmatrix

    target = check_out_file(out, overwrite, example="cmatrix.png")
    check_png_name(out)
    cm = load_cmatrix(file)
    plot_cmatrix(cm, target, title=title)
    click.echo(f"wrote {out}: {summary_line(cm)}")


def _prepare_out_dir(out: str, names: list[str], overwrite: bool) -> Path:
    """Create the --out directory if needed; refuse figures already there unless `overwrite`."""
    path = Path(out)  # click has refused an existing file already
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KDError(f"cannot create --out {out}: {error.strerror or error}") from None
    existing = [name for name in names if (path / name).exists()]
    if existing and not overwrite:
        raise KDError(f"--out {out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    return path


def predict_test_split(net: nn.Module, data: ImageDataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) logits and (N,) labels of the whole test split, in order, on the CPU in float32."""
    from kd.training.evaluate import predict

    if len(data.test) == 0:
        raise KDError(f"the {data.name} test split is empty: nothing to draw a reliability diagram of")
    return predict(net, data, "test", batch_size)


def read_summary_rows(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of a run's summary.csv (one per epoch, validation columns filled where it ran); none
    without the file (a run written by hand or before the file existed). Unreadable: a one-line KDError."""
    import csv

    from kd.training.rundir import SUMMARY_FILE

    path = Path(run_dir) / SUMMARY_FILE
    try:
        with open(path, newline="", encoding="utf-8") as file:
            return list(csv.DictReader(file))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise KDError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


@click.command("plot")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the figures (created if missing).")
@click.option("--overwrite", is_flag=True, help="Replace figures already in --out.")
@click.option("--bins", type=click.IntRange(min=1), default=15, show_default=True,
              help="Confidence bins of the reliability diagram (metrics.json's test_ece uses 15).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Batch size for the pass over the test split.")
def plot_command(run_dir: str, out: str, overwrite: bool, bins: int, batch_size: int) -> None:
    """Draw a finished run's figures into --out.

    curves.png: every per-epoch list of metrics.json (training loss and its parts, ...) and, for a
    run with --val-split, the validation top-1 and NLL at each epoch validation ran (summary.csv).
    reliability.png: the test split's reliability diagram, from predictions recomputed on the
    CPU with the run's model.safetensors and the dataset of its config.json. cmatrix.png: the
    run's cmatrix.safetensors, when it has one.
    """
    from kd.cmatrix.artifact import load_cmatrix
    from kd.reports.plots import VALIDATION_PANELS, plot_cmatrix, plot_curves, plot_reliability, validation_series
    from kd.training.run_data import load_run_data
    from kd.training.rundir import CMATRIX_FILE, METRICS_FILE, SUMMARY_FILE, load_run_model, read_run_json

    metrics = read_run_json(run_dir, METRICS_FILE, "did the run finish?")
    summary = read_summary_rows(run_dir)
    try:
        validation = validation_series(summary)
    except KDError as error:
        raise KDError(f"{Path(run_dir) / SUMMARY_FILE}: {error}") from None
    cmatrix_file = Path(run_dir) / CMATRIX_FILE
    names = [CURVES_FILE, RELIABILITY_FILE] + ([CMATRIX_PNG] if cmatrix_file.is_file() else [])
    net, config = load_run_model(run_dir)
    target = _prepare_out_dir(out, names, overwrite)

    try:
        plot_curves(metrics, target / CURVES_FILE, summary=summary)
    except KDError as error:
        raise KDError(f"{Path(run_dir) / METRICS_FILE}: {error}") from None
    note = ""
    if validation:
        drawn = " and ".join(title for column, title, _ in VALIDATION_PANELS if column in validation)
        evaluated = len({epoch for epochs, _ in validation.values() for epoch in epochs})
        note = f" (with the {drawn} of {evaluated} evaluated epoch{'s' * (evaluated != 1)})"
    click.echo(f"wrote {target / CURVES_FILE}{note}")

    data = load_run_data(run_dir, config)
    logits, labels = predict_test_split(net, data, batch_size)
    title = f"{config['model']} / {config.get('method', '?')} on {data.name} (test split)"
    ece = plot_reliability(logits, labels, target / RELIABILITY_FILE, bins=bins, title=title)
    recorded = metrics.get("test_ece")
    note = f" (metrics.json test_ece {recorded:.4f})" if isinstance(recorded, float) and bins == 15 else ""
    click.echo(f"wrote {target / RELIABILITY_FILE}: ECE {ece:.4f} over {len(labels)} test images, {bins} bins{note}")

    if cmatrix_file.is_file():
        plot_cmatrix(load_cmatrix(cmatrix_file), target / CMATRIX_PNG)
        click.echo(f"wrote {target / CMATRIX_PNG}")
