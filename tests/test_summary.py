"""The per-epoch record: summary.csv, the validation split (--val-split, --eval-every) and
Accelerate trackers (--log-with tensorboard), each checked against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd.data.datasets import ImageDataset, InMemorySplit, load_dataset
from kd.data.splits import validation_split
from kd.training.rundir import load_run_model
from tests.helpers import assert_one_line_error, evaluate_in_one_process, kd_in_process, read_run, read_summary


def tagged_dataset(per_class: tuple[int, ...]) -> ImageDataset:
    """Images whose first two pixels spell their index, so a split can be traced back."""
    labels = torch.cat([torch.full((n,), label) for label, n in enumerate(per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    images = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
    index = torch.arange(len(labels))
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (index // 256).to(torch.uint8), (index % 256).to(torch.uint8)
    split = InMemorySplit(images, labels.to(torch.int64))
    return ImageDataset(
        name="tagged", class_names=[str(i) for i in range(len(per_class))], channels=1, image_size=4,
        train=split, test=split, in_memory=True, default_augment=(), mean=(0.5,), std=(0.25,),
    )


def indices(split: InMemorySplit) -> list[int]:
    return (split.images[:, 0, 0, 0].long() * 256 + split.images[:, 0, 0, 1].long()).tolist()


def test_validation_split_is_stratified_seeded_and_disjoint():
    data = tagged_dataset((100, 41, 7))
    split = validation_split(data, 0.2, seed=0)
    train, val = indices(split.train), indices(split.val)
    assert sorted(train + val) == list(range(148)) and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # the dataset's order is kept
    labels = data.train.labels
    assert [int((labels[val] == c).sum()) for c in range(3)] == [20, 8, 1]  # round(0.2 x n) per class
    assert indices(validation_split(data, 0.2, seed=0).val) == val
    assert indices(validation_split(data, 0.2, seed=1).val) != val
    with pytest.raises(Exception, match="class '2' has 7 training image"):
        validation_split(data, 0.95, seed=0)


def test_summary_csv_has_a_row_per_epoch_with_validation_where_due(tmp_path):
    out = tmp_path / "run"
    result = kd_in_process("train-teacher", "--out", str(out), "--epochs", "3", "--batch-size", "64", "--model", "tiny_cnn",
                           "--val-split", "0.2", "--eval-every", "2")
    assert result.returncode == 0, result.stderr
    config, metrics = read_run(out)
    assert config["val_split"] == 0.2 and config["eval_every"] == 2
    rows = read_summary(out)
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    steps_per_epoch = metrics["steps"] // 3
    assert [int(row["step"]) for row in rows] == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    # Validation on epochs 2 and 3 (the last), not 1; the test split only in the last row.
    assert [bool(row["val_top1"]) for row in rows] == [False, True, True]
    assert [bool(row["test_top1"]) for row in rows] == [False, False, True]
    for part, values in metrics["epoch_loss_parts"].items():
        assert [float(row[f"train_{part}"]) for row in rows] == pytest.approx(values, rel=1e-7)
    for name in ("val_top1", "val_nll", "val_ece", "test_top1", "test_nll", "test_ece"):
        assert float(rows[-1][name]) == pytest.approx(metrics[name], rel=1e-7)
    lrs = [float(row["lr"]) for row in rows]
    assert lrs[0] > lrs[1] > lrs[2] > 0  # cosine decay: the lr of each epoch's last step
    assert all(float(row["images_per_second"]) > 0 for row in rows)

    # The reported validation metrics are the held-out images': evaluate the saved model on them.
    net, _ = load_run_model(out)
    data = validation_split(load_dataset("digits"), 0.2, seed=0)
    expected = evaluate_in_one_process(net, data, "val")
    assert metrics["val_top1"] == expected["top1"]
    assert metrics["val_nll"] == pytest.approx(expected["nll"], rel=1e-5)


def test_validation_flags_are_checked_in_one_line(tmp_path):
    out = str(tmp_path / "run")
    assert_one_line_error(kd_in_process("train-teacher", "--out", out, "--eval-every", "2"), "--eval-every", "--val-split")
    assert_one_line_error(kd_in_process("train-teacher", "--out", out, "--val-split", "1.5"), "--val-split")
    assert_one_line_error(kd_in_process("train-teacher", "--out", out, "--log-with", "nosuch"), "--log-with", "nosuch")
    assert not Path(out).exists()


def test_tensorboard_scalars_match_summary_csv(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = kd_in_process("distill", "--out", str(out), "--epochs", "2", "--batch-size", "64",
                           "--model", "tiny_cnn", "--log-with", "tensorboard")
    assert result.returncode == 0, result.stderr
    rows = read_summary(out)
    events = [path for path in (out / "tensorboard").glob("events.out.tfevents.*")]
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    for name in ("train_loss", "lr", "images_per_second"):
        scalars = accumulator.Scalars(name)
        assert [event.step for event in scalars] == [1, 2]
        assert [event.value for event in scalars] == pytest.approx([float(row[name]) for row in rows], rel=1e-6)
    assert [event.step for event in accumulator.Scalars("test_top1")] == [2]
    assert json.loads((out / "config.json").read_text())["log_with"] == "tensorboard"
