"""Tests for kd.reports.plots and the figure commands (`kd cmatrix plot`, `kd plot`): real PNGs, not blank."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lspp_kd.cli.main import cli
from lspp_kd.cli.plot_commands import plot_command
from kd.cmatrix.artifact import CMatrix
from kd.errors import KDError
from kd.reports.metrics import classification_metrics
from kd.reports import plots
from kd.reports.plots import (
    DPI,
    calibration_bins,
    curves_figure,
    epoch_series,
    plot_cmatrix,
    plot_curves,
    plot_reliability,
    sparse_bins,
    validation_series,
)
from tests.helpers import (
    assert_one_line_error,
    assert_one_line_kderror,
    hand_made_run,
    kd_in_process,
    read_run,
    read_summary,
)


def assert_png(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """`path` is a PNG (of `size`, if given) with real content: many colours, not one flat tone."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        if size is not None:
            assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    packed = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)  # one int per colour
    colours = np.unique(packed)
    assert len(colours) > 20, f"{path}: only {len(colours)} colours"
    assert pixels.std() > 20, f"{path}: nearly blank"
    return pixels


def random_cmatrix(k: int, seed: int = 0) -> CMatrix:
    generator = torch.Generator().manual_seed(seed)
    names = [f"class_{i}" if i % 9 else f"a_rather_long_class_name_{i}" for i in range(k)]
    return CMatrix.from_logits(torch.randn(k, k - 1, generator=generator) * 2, names, alpha=0.1,
                               dataset="synthetic", teacher_model="small_cnn")


def predictions(n: int = 600, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Over-confident logits: right on about 60% of the samples."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator) * 3
    labels = torch.randint(0, k, (n,), generator=generator)
    right = torch.rand(n, generator=generator) < 0.6
    labels[right] = logits[right].argmax(dim=1)
    return logits, labels


# ----------------------------------------------------------------------------- C-matrix heatmap


def test_cmatrix_heatmap_10_classes(tmp_path):
    path = plot_cmatrix(random_cmatrix(10), tmp_path / "cm.png")
    assert path == tmp_path / "cm.png"
    assert_png(path, size=(round(10.5 * DPI), 9 * DPI))
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary file left


def test_cmatrix_heatmap_100_classes_grows(tmp_path):
    pixels = assert_png(plot_cmatrix(random_cmatrix(100), tmp_path / "cm.png", title="CIFAR-100-sized"),
                        size=(round(21.5 * DPI), 20 * DPI))
    assert pixels.shape[0] > 2 * 9 * DPI


def test_png_permissions_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        path = plot_cmatrix(random_cmatrix(3), tmp_path / "cm.png")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640


def test_unwritable_destination_is_one_line_kderror(tmp_path):
    with pytest.raises(KDError) as info:
        plot_cmatrix(random_cmatrix(3), tmp_path / "missing" / "cm.png")
    assert_one_line_kderror(info, "missing")


# ----------------------------------------------------------------------------- reliability diagram


def test_reliability_diagram_and_its_ece(tmp_path):
    logits, labels = predictions()
    ece = plot_reliability(logits, labels, tmp_path / "rel.png")
    assert ece == classification_metrics(logits, labels)["ece"]  # kd.reports.metrics' number, 15 bins
    assert_png(tmp_path / "rel.png", size=(6 * DPI, 7 * DPI))
    # The bars are binned as kd.reports.metrics bins: their weighted gaps add up to the same ECE.
    count, confidence, accuracy = calibration_bins(logits.double(), labels, 15)
    filled = count > 0
    assert count.sum() == len(labels)
    assert np.sum(count[filled] * np.abs(accuracy[filled] - confidence[filled])) / len(labels) == pytest.approx(ece, abs=1e-12)


def test_thin_bins_are_marked_sparse_not_read_as_accuracy(tmp_path):
    # 2,000 predictions near 0.55 confidence and one correct one near 0.99: that bin's accuracy is 1
    # from a single prediction, so it is drawn faint (below max(10, 0.5% of 2,001) = 11 predictions).
    many = torch.tensor([[0.2, 0.0]]).repeat(2000, 1)
    logits = torch.cat([many, torch.tensor([[5.0, 0.0]])])
    labels = torch.zeros(2001, dtype=torch.long)
    count, _, accuracy = calibration_bins(logits.double(), labels, 15)
    assert np.flatnonzero(count).tolist() == [8, 14] and accuracy[14] == 1.0
    assert np.flatnonzero(sparse_bins(count)).tolist() == [14]
    assert sparse_bins(np.array([0, 10, 9, 1981])).tolist() == [False, False, True, False]  # at least 10
    assert sparse_bins(np.array([0, 10, 11, 2179])).tolist() == [False, True, False, False]  # 0.5% of 2,200 = 11
    plot_reliability(logits, labels, tmp_path / "rel.png")
    assert_png(tmp_path / "rel.png", size=(6 * DPI, 7 * DPI))


def test_reliability_diagram_takes_probabilities_too(tmp_path):
    logits, labels = predictions(seed=1)
    from_logits = plot_reliability(logits, labels, tmp_path / "a.png", bins=10)
    from_probs = plot_reliability(torch.softmax(logits, dim=1), labels, tmp_path / "b.png", bins=10)
    assert from_probs == pytest.approx(from_logits, abs=1e-6)
    assert from_logits == classification_metrics(logits, labels, n_bins=10)["ece"]


def test_reliability_diagram_rejects_bad_input(tmp_path):
    logits, labels = predictions(n=20)
    with pytest.raises(ValueError):
        plot_reliability(logits, labels[:10], tmp_path / "x.png")
    with pytest.raises(KDError, match="bins"):
        plot_reliability(logits, labels, tmp_path / "x.png", bins=0)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- training curves


def test_curves_plot_every_per_epoch_list(tmp_path):
    metrics = {
        "model": "small_cnn", "method": "lspp", "epochs": 4, "class_names": ["a", "b"], "test_top1": 0.5,
        "epoch_train_loss": [6.3, 5.0, 4.2, 3.9],
        "epoch_loss_parts": {"loss": [6.3, 5.0, 4.2, 3.9], "network": [2.3, 1.5, 1.0, 0.8], "cmatrix": [4.0, 3.5, 3.2, 3.1]},
        "epoch_test_top1": [0.3, 0.6, None, 0.9],  # None: a non-finite value in strict JSON
        "epoch_eval": {"nll": [1.0, 0.8, 0.7, 0.6], "ece": [0.2, 0.1, 0.1, 0.05]},
    }
    panels = epoch_series(metrics)
    assert list(panels) == ["training loss", "test top1", "eval"]
    assert [label for label, _ in panels["training loss"]] == ["total", "network", "cmatrix"]
    assert np.isnan(panels["test top1"][0][1][2])
    assert [label for label, _ in panels["eval"]] == ["nll", "ece"]
    assert_png(plot_curves(metrics, tmp_path / "curves.png"), size=(15 * DPI, round(3.6 * DPI)))


def test_curves_of_a_single_epoch_and_of_nothing(tmp_path):
    assert_png(plot_curves({"epoch_train_loss": [2.3], "epoch_loss_parts": {"loss": [2.3]}}, tmp_path / "one.png"))
    with pytest.raises(KDError, match="no per-epoch values"):
        plot_curves({"test_top1": 0.9, "epoch_train_loss": []}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def panels_of(figure) -> dict[str, dict]:
    """{title: {"ylabel", "xlim", "lines": [(x, y), ...]}} of a figure's visible panels, in order."""
    return {
        axes.get_title(): {
            "ylabel": axes.get_ylabel(), "xlim": axes.get_xlim(),
            "lines": [(list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()],
        }
        for axes in figure.axes if axes.get_visible()
    }


CURVES_METRICS = {
    "model": "small_cnn", "method": "lspp", "epochs": 4,
    "epoch_train_loss": [6.3, 5.0, 4.2, 3.9],
    "epoch_loss_parts": {"loss": [6.3, 5.0, 4.2, 3.9], "network": [2.3, 1.5, 1.0, 0.8]},
    "epoch_test_top1": [0.3, 0.6, 0.7, 0.9],
}
# summary.csv as csv.DictReader reads it: validation ran on epochs 2 and 4 (--eval-every 2), not 1 and 3.
SUMMARY_ROWS = [
    {"epoch": "1", "train_loss": "6.3", "val_top1": "", "val_nll": "", "val_ece": ""},
    {"epoch": "2", "train_loss": "5.0", "val_top1": "0.625", "val_nll": "1.25", "val_ece": "0.2"},
    {"epoch": "3", "train_loss": "4.2", "val_top1": "", "val_nll": "", "val_ece": ""},
    {"epoch": "4", "train_loss": "3.9", "val_top1": "0.8125", "val_nll": "0.75", "val_ece": "0.1", "test_top1": "0.9"},
]


def test_curves_draw_validation_panels_beside_the_training_loss(tmp_path):
    assert validation_series(SUMMARY_ROWS) == {"val_top1": ([2, 4], [0.625, 0.8125]), "val_nll": ([2, 4], [1.25, 0.75])}
    panels = panels_of(curves_figure(CURVES_METRICS, SUMMARY_ROWS))
    assert list(panels) == ["training loss", "validation top-1", "validation NLL", "test top1"]
    # One line each, a point per evaluated epoch (with a marker), on the training loss's epoch axis.
    assert panels["validation top-1"]["lines"] == [([2, 4], [0.625, 0.8125])]
    assert panels["validation NLL"]["lines"] == [([2, 4], [1.25, 0.75])]
    assert panels["validation top-1"]["ylabel"] == "top-1 accuracy" and panels["validation NLL"]["ylabel"] == "NLL (nats)"
    loss_xlim = panels["training loss"]["xlim"]
    assert loss_xlim[0] < 1 and panels["validation top-1"]["xlim"] == panels["validation NLL"]["xlim"] == loss_xlim
    assert panels["training loss"]["lines"] == [([1, 2, 3, 4], [6.3, 5.0, 4.2, 3.9]), ([1, 2, 3, 4], [2.3, 1.5, 1.0, 0.8])]
    # Four panels: two rows of three.
    path = plots.plot_curves(CURVES_METRICS, tmp_path / "curves.png", summary=SUMMARY_ROWS)
    assert_png(path, size=(15 * DPI, round(7.2 * DPI)))


def test_curves_without_validation_look_as_before(tmp_path):
    no_validation = [{key: value for key, value in row.items() if not key.startswith("val_")} for row in SUMMARY_ROWS]
    for summary in ((), no_validation, [{**row, "val_top1": "", "val_nll": ""} for row in no_validation]):
        assert validation_series(summary) == {}
        panels = panels_of(curves_figure(CURVES_METRICS, summary))
        assert list(panels) == ["training loss", "test top1"]
        assert all(panel["ylabel"] == "" for panel in panels.values())
    assert_png(plot_curves(CURVES_METRICS, tmp_path / "curves.png"), size=(10 * DPI, round(3.6 * DPI)))


def test_validation_series_of_odd_summaries():
    # Validation at the last epoch only; a diverged (nan) value stays a gap; no epoch column: the row's position.
    rows = [{"val_top1": "", "val_nll": ""}, {"val_top1": "0.5", "val_nll": "nan"}, {"val_top1": 0.75, "val_nll": 0.5}]
    series = validation_series(rows)
    assert series["val_top1"] == ([2, 3], [0.5, 0.75])
    assert series["val_nll"][0] == [2, 3] and np.isnan(series["val_nll"][1][0])
    assert validation_series([{"epoch": "5", "val_top1": "0.5", "val_nll": "nan"}]) == {"val_top1": ([5], [0.5])}
    with pytest.raises(KDError) as info:
        validation_series([{"epoch": "1", "val_top1": "high"}])
    assert_one_line_kderror(info, "row 1", "val_top1", "high")
    # Validation values alone (no per-epoch lists in metrics.json) are still a figure.
    assert list(panels_of(curves_figure({}, rows))) == ["validation top-1", "validation NLL"]


# ----------------------------------------------------------------------------- the commands


@pytest.fixture
def tiny_run(digits_teacher) -> Path:
    """A finished LS++ teacher on digits (it has a cmatrix.safetensors)."""
    return digits_teacher


@pytest.fixture
def with_plot_command(monkeypatch):
    """`kd plot` reachable through `lspp_kd.cli.main:main`, whether or not cli/main.py registers it yet."""
    monkeypatch.setitem(cli.commands, "plot", plot_command)


def test_kd_cmatrix_plot(tmp_path, tiny_run):
    out = tmp_path / "cm.png"
    source = str(tiny_run / "cmatrix.safetensors")
    result = kd_in_process("cmatrix", "plot", source, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "K=10" in result.stdout
    assert_png(out)
    assert_one_line_error(kd_in_process("cmatrix", "plot", source, "--out", str(out)), "--overwrite")
    assert kd_in_process("cmatrix", "plot", source, "--out", str(out), "--overwrite", "--title", "mine").returncode == 0
    assert_one_line_error(kd_in_process("cmatrix", "plot", source, "--out", str(tmp_path)), "is a directory")
    assert_one_line_error(kd_in_process("cmatrix", "plot", source, "--out", str(tmp_path / "cm.jpg")), ".png")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert_one_line_error(kd_in_process("cmatrix", "plot", str(broken), "--out", str(tmp_path / "b.png")), str(broken))
    assert not (tmp_path / "b.png").exists()


def test_kd_plot_run_dir(tmp_path, tiny_run, with_plot_command):
    out = tmp_path / "figures" / "teacher"
    result = kd_in_process("plot", str(tiny_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cmatrix.png", "curves.png", "reliability.png"]
    for png in out.iterdir():
        assert_png(png)
    # The recomputed test predictions give the ECE the run recorded.
    recorded = json.loads((tiny_run / "metrics.json").read_text())["test_ece"]
    line = next(line for line in result.stdout.splitlines() if "reliability.png" in line)
    assert f"ECE {recorded:.4f}" in line and "over 360 test images" in line
    assert_one_line_error(kd_in_process("plot", str(tiny_run), "--out", str(out)), "--overwrite", "curves.png")
    assert kd_in_process("plot", str(tiny_run), "--out", str(out), "--overwrite", "--bins", "10").returncode == 0


@pytest.fixture
def drawn_curves(monkeypatch) -> list[dict]:
    """The panels (see `panels_of`) of every curves figure drawn, read before it is saved and cleared."""
    drawn = []
    real = plots.curves_figure

    def spy(*args, **kwargs):
        figure = real(*args, **kwargs)
        drawn.append(panels_of(figure))
        return figure

    monkeypatch.setattr(plots, "curves_figure", spy)
    return drawn


def test_kd_plot_draws_the_validation_curves_of_a_val_split_run(tmp_path, tiny_run, with_plot_command, drawn_curves):
    run = tmp_path / "run"
    result = kd_in_process("train-teacher", "--out", str(run), "--epochs", "3", "--batch-size", "64", "--model", "tiny_cnn",
                           "--val-split", "0.2", "--eval-every", "2")
    assert result.returncode == 0, result.stderr
    _, metrics = read_run(run)
    rows = read_summary(run)
    out = tmp_path / "figs"
    result = kd_in_process("plot", str(run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / 'curves.png'} (with the validation top-1 and validation NLL of 2 evaluated epochs)" in result.stdout
    assert_png(out / "curves.png")
    [panels] = drawn_curves
    assert list(panels) == ["training loss", "validation top-1", "validation NLL"]
    for title, column in (("validation top-1", "val_top1"), ("validation NLL", "val_nll")):
        [(epochs, values)] = panels[title]["lines"]
        assert epochs == [2, 3]  # every --eval-every 2 epochs, and the last
        assert values == [float(rows[1][column]), float(rows[2][column])]
        assert values[-1] == pytest.approx(metrics[column], rel=1e-7)  # the last validation, as metrics.json has it
        assert panels[title]["xlim"] == panels["training loss"]["xlim"]
    assert panels["training loss"]["lines"][0] == ([1, 2, 3], pytest.approx(metrics["epoch_train_loss"]))

    # A run without --val-split: the training loss alone, as before, and the same output line.
    result = kd_in_process("plot", str(tiny_run), "--out", str(tmp_path / "plain"))
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'plain' / 'curves.png'}\n" in result.stdout
    assert list(drawn_curves[-1]) == ["training loss"]

    # A summary.csv with a broken validation cell: one line naming it, nothing written.
    rows[1]["val_top1"] = "oops"
    with open(run / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert_one_line_error(kd_in_process("plot", str(run), "--out", str(tmp_path / "broken")), "summary.csv", "row 2", "oops")
    assert not (tmp_path / "broken").exists()


def test_kd_plot_problems_are_one_line_errors(tmp_path, tiny_run, with_plot_command):
    out = str(tmp_path / "figs")
    assert_one_line_error(kd_in_process("plot", str(tmp_path / "absent"), "--out", out), "not found", "absent")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run, unfinished)
    (unfinished / "metrics.json").unlink()
    assert_one_line_error(kd_in_process("plot", str(unfinished), "--out", out), "metrics.json")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert_one_line_error(kd_in_process("plot", str(tiny_run), "--out", str(a_file)), "--out", "is a file")
    assert_one_line_error(kd_in_process("plot", str(tiny_run), "--out", str(a_file / "figs")), "cannot create")
    assert not Path(out).exists()


def test_kd_plot_of_a_run_with_val_split_draws_its_whole_test_split(tmp_path, with_plot_command):
    """--train-per-class and --val-split select training images only: the reliability diagram is of
    the whole test split, the one the run's metrics.json reports on."""
    from kd.data.datasets import load_dataset
    from kd.data.loader import Normalize
    from kd.training.rundir import load_run_model

    run = hand_made_run(tmp_path / "run", train_per_class=40, val_split=0.5)
    net, _ = load_run_model(run)
    digits = load_dataset("digits")
    with torch.no_grad():
        logits = net(Normalize(digits.mean, digits.std, torch.device("cpu"))(digits.test.images))
    ece = classification_metrics(logits, digits.test.labels)["ece"]
    (run / "metrics.json").write_text(json.dumps({"epoch_train_loss": [2.0, 1.5], "test_ece": ece}))
    result = kd_in_process("plot", str(run), "--out", str(tmp_path / "figs"))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "reliability.png" in line)
    assert f"ECE {ece:.4f} over 360 test images" in line and f"test_ece {ece:.4f}" in line

