"""Figures as PNG files: a C-matrix heatmap, a reliability diagram and per-epoch training curves.

* `plot_cmatrix`: the learned class-similarity matrix drawn like the paper's Fig. 3: rows are
  the true classes, columns the other classes, the diagonal left blank (it is 0 by
  construction). Up to `ANNOTATE_MAX_CLASSES` classes every cell shows its value; above that
  the cells carry no text, the tick labels get small and thinned, and the figure grows with K
  (up to `MAX_SIDE_INCHES`), so 100 classes stay readable.
* `plot_reliability`: a reliability diagram (Guo et al. 2017): per confidence bin, the
  accuracy as a bar against the diagonal of perfect calibration, the gap to the bin's mean
  confidence shaded, and the ECE in the title, computed by `kd.reports.metrics` (the number
  `metrics.json` reports as `test_ece` for the same predictions).
* `plot_curves`: every per-epoch list of a run's `metrics.json` (`epoch_train_loss`, the parts
  of `epoch_loss_parts`, and any later `epoch_*` list or dict of lists) against the epoch and,
  for a run with `--val-split`, the validation top-1 and NLL of its `summary.csv` rows against
  the epochs they were evaluated at (`curves_figure` returns the figure unsaved).

Figures are drawn with matplotlib's object-oriented API on an Agg canvas: no display, no
pyplot state, nothing left open (each `Figure` is local to its function and freed with it).
Every PNG is written atomically with the umask-honouring permissions of `kd.io.atomic_path`;
an unwritable destination is a one-line `KDError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kd.cmatrix.artifact import CMatrix
from kd.errors import KDError, one_line
from kd.io import atomic_path
from kd.reports.metrics import classification_metrics

DPI = 110
# C-matrix heatmaps: values in the cells up to this many classes ...
ANNOTATE_MAX_CLASSES = 20
# ... every class named on the axes up to this many (above: every n-th, so about this many) ...
LABEL_EVERY_MAX_CLASSES = 50
# ... and the figure's side grows with K up to this.
MAX_SIDE_INCHES = 24.0
_NAME_CHARS = 16  # longer class names are cut on the axes


# ---------------------------------------------------------------------------------------------
# helpers


def _new_figure(size: tuple[float, float], **kwargs: Any) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no display), laid out without overlaps."""
    figure = Figure(figsize=size, dpi=DPI, layout="constrained", **kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` to `path` as a PNG, atomically; an OSError becomes a one-line KDError."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)
    except OSError as error:
        raise KDError(f"cannot write {path}: {error.strerror or one_line(error)}") from None
    finally:
        figure.clear()
    return path


def _short_name(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 1] + "\u2026"


def _text_colour(rgba: Sequence[float]) -> str:
    """Black on light cells, white on dark ones."""
    red, green, blue = rgba[:3]
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


# ---------------------------------------------------------------------------------------------
# C-matrix


def _cmatrix_title(cm: CMatrix) -> str:
    teacher = cm.teacher_model or "unknown teacher"
    if cm.teacher_top1 is not None:
        teacher += f" (top-1 {cm.teacher_top1:.4f})"
    return f"C-matrix ({cm.source}), {cm.dataset or 'unknown dataset'}, {teacher}, K={cm.num_classes}"


def plot_cmatrix(cm: CMatrix, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw `cm` as a labelled heatmap (rows: true class, columns: other class, blank diagonal).

    The colour scale spans the off-diagonal probabilities, smallest to largest (from 0 for a
    uniform matrix), as in the paper's Fig. 3. Returns the path written. `title` defaults to the source, dataset, teacher and K from the file.
    """
    k = cm.num_classes
    probs = cm.probs.detach().to("cpu", torch.float64).numpy().copy()
    np.fill_diagonal(probs, np.nan)
    annotate = k <= ANNOTATE_MAX_CLASSES
    side = min(max(3.0 + (0.6 if annotate else 0.17) * k, 6.0), MAX_SIDE_INCHES)
    figure = _new_figure((side + 1.5, side))
    axes = figure.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="white")
    vmin, vmax = float(np.nanmin(probs)), float(np.nanmax(probs))
    if vmax <= vmin:  # a uniform matrix: one colour, on a scale from 0
        vmin, vmax = 0.0, vmax or 1.0
    image = axes.imshow(np.ma.masked_invalid(probs), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="probability")

    step = max(1, math.ceil(k / LABEL_EVERY_MAX_CLASSES))
    ticks = list(range(0, k, step))
    names = [_short_name(cm.class_names[i]) for i in ticks]
    font = 9 if annotate else max(5, 8 - k // 40)
    axes.set_xticks(ticks, names, rotation=90, fontsize=font)
    axes.set_yticks(ticks, names, fontsize=font)
    axes.set_xlabel("other class")
    axes.set_ylabel("true class")
    axes.set_title(title if title is not None else _cmatrix_title(cm), fontsize=10 if annotate else 12)
    if annotate:
        digits = 2 if k <= 10 else 3
        cell_font = 8 if k <= 10 else 6
        for row in range(k):
            for column in range(k):
                if row != column:
                    value = probs[row, column]
                    axes.text(column, row, f"{value:.{digits}f}", ha="center", va="center", fontsize=cell_font,
                              color=_text_colour(cmap(image.norm(value))))
    return _save(figure, path)


# ---------------------------------------------------------------------------------------------
# reliability diagram


def _as_logits(probs_or_logits: Any) -> torch.Tensor:
    """(N, K) float64 logits: probabilities (every row in [0, 1] summing to 1) are taken as their log."""
    scores = torch.as_tensor(probs_or_logits).detach().to("cpu", torch.float64)
    if scores.dim() == 2 and scores.numel() and torch.isfinite(scores).all():
        is_probs = bool(((scores >= 0) & (scores <= 1)).all()) and bool(
            torch.allclose(scores.sum(dim=1), torch.ones(scores.shape[0], dtype=torch.float64), atol=1e-3)
        )
        if is_probs:
            return scores.log()  # log_softmax(log p) = log p: the same confidences and predictions
    return scores


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: (count, mean confidence, accuracy), NaN for empty bins.

    The confidences are those of `kd.reports.metrics.classification_metrics` (max softmax probability,
    in float64) and bin m holds (m/bins, (m+1)/bins] as in `kd.reports.metrics.expected_calibration_error`
    (a confidence of 0 in the first bin), so these bars add up to its ECE.
    """
    log_probs = torch.log_softmax(logits.to(torch.float64), dim=1)
    max_log_prob, predictions = log_probs.max(dim=1)
    confidences = max_log_prob.exp()
    correct = (predictions == labels.to(torch.long)).to(torch.float64)
    inner_edges = torch.arange(1, bins, dtype=torch.float64) / bins
    index = torch.bucketize(confidences, inner_edges, right=False).clamp_(0, bins - 1)
    count = torch.bincount(index, minlength=bins).to(torch.float64)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidences)
    corr_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count.numpy(), (conf_sum / count).numpy(), (corr_sum / count).numpy()


def sparse_bins(count: np.ndarray) -> np.ndarray:
    """The bins too thin to read an accuracy from: fewer than max(10, 0.5% of all) predictions.

    A bin holding one correct prediction has accuracy 1 and would be drawn as a full bar;
    the reliability diagram draws these faint instead (they still count towards the ECE).
    """
    count = np.asarray(count, dtype=np.float64)
    return (count > 0) & (count < _sparse_threshold(count.sum()))


def _sparse_threshold(n: float) -> int:
    return int(np.ceil(max(10.0, 0.005 * float(n))))


def plot_reliability(
    probs_or_logits: Any, labels: Any, path: str | os.PathLike, bins: int = 15, *, title: str | None = None
) -> float:
    """Draw a reliability diagram of (N, K) predictions against (N,) integer labels; return the ECE.

    `probs_or_logits` is taken as probabilities when every row lies in [0, 1] and sums to 1
    (within 1e-3), else as logits. Top: each non-empty bin's accuracy as a bar, the gap to
    the bin's mean confidence shaded, the diagonal of perfect calibration, and the ECE (from
    `kd.reports.metrics.classification_metrics`, `bins` equal-width bins) in the title; bins with too
    few predictions to read (`sparse_bins`) are drawn faint. Bottom: the share of predictions
    per bin.
    """
    logits = _as_logits(probs_or_logits)
    labels = torch.as_tensor(labels).detach().cpu()
    metrics = classification_metrics(logits, labels, n_bins=bins)  # also checks shapes, labels and bins
    ece = metrics["ece"]
    count, confidence, accuracy = calibration_bins(logits, labels, bins)
    n = int(count.sum())
    width = 1.0 / bins
    centres = (np.arange(bins) + 0.5) * width
    faint = sparse_bins(count)
    solid = (count > 0) & ~faint

    figure = _new_figure((6.0, 7.0))
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    gap_label = "gap to mean confidence"
    for shown, alpha, suffix in ((solid, 1.0, ""), (faint, 0.25, f" (faint: < {_sparse_threshold(n)} predictions)")):
        if not shown.any():
            continue
        top.bar(centres[shown], accuracy[shown], width=width, color="#3b75af", edgecolor="black", linewidth=0.6,
                alpha=alpha, label="accuracy" + suffix)
        gap = confidence[shown] - accuracy[shown]
        top.bar(centres[shown], gap, bottom=accuracy[shown], width=width, color="#d62728", alpha=0.3 * alpha,
                edgecolor="#d62728", hatch="//", linewidth=0.6, label=gap_label)
        gap_label = None
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1.2, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(
        f"{title or 'Reliability diagram'}\nECE {ece:.4f} ({bins} bins), top-1 {metrics['top1']:.4f}, "
        f"mean confidence {metrics['mean_confidence']:.4f}, N={n}",
        fontsize=10,
    )
    bottom.bar(centres, count / n, width=width, color="grey", edgecolor="black", linewidth=0.6)
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("share")
    _save(figure, path)
    return ece


# ---------------------------------------------------------------------------------------------
# training curves


def _as_series(value: Any) -> list[float] | None:
    """A list of numbers (None, i.e. a non-finite value in strict JSON, becomes NaN), else None."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    numbers = []
    for item in value:
        if item is None:
            numbers.append(math.nan)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            numbers.append(float(item))
        else:
            return None
    return numbers if any(math.isfinite(x) for x in numbers) else None


def epoch_series(metrics: Mapping[str, Any]) -> dict[str, list[tuple[str, list[float]]]]:
    """The per-epoch lists of a run's metrics, grouped into panels: {panel title: [(label, values)]}.

    A per-epoch list is a list of numbers under a key starting with `epoch_`, or in a dict
    (part -> list) under such a key. `epoch_train_loss` and the parts of `epoch_loss_parts`
    share the "training loss" panel (a part equal to the total is not drawn twice); every
    other list gets its own panel, and every other dict one panel with a line per entry.
    """
    panels: dict[str, list[tuple[str, list[float]]]] = {}
    total = _as_series(metrics.get("epoch_train_loss"))
    loss_panel = "training loss"
    if total is not None:
        panels[loss_panel] = [("total", total)]
    for key, value in metrics.items():
        if not key.startswith("epoch_") or key == "epoch_train_loss":
            continue
        name = key.removeprefix("epoch_").replace("_", " ")
        if isinstance(value, Mapping):
            panel = loss_panel if key == "epoch_loss_parts" else name
            for part, values in value.items():
                series = _as_series(values)
                if series is not None and not (panel == loss_panel and series == total):
                    panels.setdefault(panel, []).append((str(part), series))
        elif (series := _as_series(value)) is not None:
            panels.setdefault(name, []).append((name, series))
    return panels


# summary.csv's validation columns drawn beside the training loss: (column, panel title, y label).
VALIDATION_PANELS = (
    ("val_top1", "validation top-1", "top-1 accuracy"),
    ("val_nll", "validation NLL", "NLL (nats)"),
)


def _summary_number(value: Any, column: str, row: int) -> float | None:
    """A summary.csv cell as a number: None when empty (not evaluated that epoch), NaN for nan."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise KDError(f"row {row}: {column} is not a number ({value!r})")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise KDError(f"row {row}: {column} is not a number ({str(value)[:40]!r})") from None


def validation_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """The validation metrics of a run's summary.csv rows: {column: (epochs evaluated, values)}.

    `rows` are summary.csv's rows (as `csv.DictReader` reads them, or the numbers themselves),
    one per epoch; a validation column is filled on the epochs validation ran (every
    `--eval-every` epochs and the last) and empty on the others, which are left out. The epoch is
    the row's `epoch` column (its position, counting from 1, without one). Only the columns of
    `VALIDATION_PANELS` with at least one finite value are returned; a cell that is not a number
    is a one-line `KDError`.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    for column, _, _ in VALIDATION_PANELS:
        epochs, values = [], []
        for index, row in enumerate(rows, start=1):
            value = _summary_number(row.get(column), column, index)
            if value is None:
                continue
            epoch = _summary_number(row.get("epoch"), "epoch", index)
            epochs.append(index if epoch is None or not math.isfinite(epoch) else int(epoch))
            values.append(value)
        if any(math.isfinite(x) for x in values):
            series[column] = (epochs, values)
    return series


def curves_figure(metrics: Mapping[str, Any], summary: Sequence[Mapping[str, Any]] = ()) -> Figure:
    """The curves figure, unsaved: every per-epoch list of `metrics` (see `epoch_series`) against the
    epoch, and with a validation split the validation top-1 and NLL of the `summary` rows (see
    `validation_series`) in their own panels after the training loss, a marker per evaluated epoch
    and the x axis shared with the training loss. Without validation values it is the per-epoch
    lists only. Raises a one-line `KDError` when there is nothing to draw.
    """
    panels = epoch_series(metrics)
    validation = validation_series(summary)
    if not panels and not validation:
        raise KDError("no per-epoch values to plot (no epoch_train_loss, epoch_loss_parts or other epoch_* lists)")
    # The panels in order: the training loss, the validation metrics, then every other per-epoch list.
    loss_panel = "training loss"
    order: list[tuple[str, Any]] = [("epoch", loss_panel)] if loss_panel in panels else []
    order += [("validation", spec) for spec in VALIDATION_PANELS if spec[0] in validation]
    order += [("epoch", panel) for panel in panels if panel != loss_panel]
    columns = min(3, len(order))
    rows = math.ceil(len(order) / columns)
    figure = _new_figure((5.0 * columns, 3.6 * rows))
    grid = figure.subplots(rows, columns, squeeze=False)
    loss_axes = None
    for axes, (kind, what) in zip(grid.flat, order):
        if kind == "epoch":
            lines = panels[what]
            for label, values in lines:
                epochs = np.arange(1, len(values) + 1)
                axes.plot(epochs, values, marker="o", markersize=3, linewidth=1.5, label=label)
            axes.set_title(what)
            if len(lines) > 1:
                axes.legend(fontsize=8)
            if what == loss_panel:
                loss_axes = axes
        else:
            column, title, ylabel = what
            epochs, values = validation[column]
            axes.plot(epochs, values, marker="o", markersize=5, linewidth=1.5, color="C4", label=ylabel)
            axes.set_title(title)
            axes.set_ylabel(ylabel)
            if loss_axes is not None:
                axes.sharex(loss_axes)  # the evaluated epochs on the training loss's epoch axis
        axes.set_xlabel("epoch")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(order):]:
        axes.set_visible(False)
    model, method = metrics.get("model"), metrics.get("method")
    if model or method:
        figure.suptitle(" / ".join(str(x) for x in (model, method) if x))
    return figure


def plot_curves(metrics: Mapping[str, Any], path: str | os.PathLike, *, summary: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Draw `curves_figure(metrics, summary)` (the per-epoch lists of a run's metrics.json and the
    validation metrics of its summary.csv rows) to `path`; returns the path written.

    Raises a one-line `KDError` when there is nothing to draw.
    """
    return _save(curves_figure(metrics, summary), path)
