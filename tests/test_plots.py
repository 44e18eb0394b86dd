"""Tests for kd.reports.plots and the figure commands (`kd cmatrix plot`, `kd plot`): real PNGs, not blank."""

from __future__ import annotations

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
from kd.reports.plots import (
    DPI,
    calibration_bins,
    epoch_series,
    plot_cmatrix,
    plot_curves,
    plot_reliability,
    sparse_bins,
)
from tests.helpers import assert_one_line_error, assert_one_line_kderror, hand_made_run, kd_in_process


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

