"""Stored soft labels: the file (round trip, top-k reconstruction, every corruption one line), sample names,
and `kd soft-labels` -> `kd distill --soft-labels` end to end on digits and on an ImageFolder tree."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kd.data.datasets import load_dataset, sample_names
from kd.data.splits import train_per_class, validation_split
from kd.softlabels.artifact import SoftLabelFile, SoftLabels, SoftLabelsError, load_soft_labels, save_soft_labels
from tests.helpers import assert_one_line_error, assert_one_line_kderror, kd_in_process, make_image_folder, read_run

INFO = dict(class_names=("a", "b", "c", "d", "e"), dataset="toy", data_fingerprint="toy: 4 train, 1 test",
            teacher_model="net", view="un-augmented")
NAMES = ["s0", "s1", "s2", "s3"]


def toy_logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(seed)) * 3


def test_whole_rows_round_trip_exactly(tmp_path):
    logits = toy_logits()
    path = tmp_path / "sl.safetensors"
    save_soft_labels(path, SoftLabelFile.from_logits(logits, None, sample_names=NAMES, **INFO))
    loaded = load_soft_labels(path)
    assert torch.equal(loaded.full_logits(), logits) and loaded.indices is None
    assert loaded.sample_names == NAMES and loaded.class_names == INFO["class_names"] and loaded.teacher_model == "net"


def test_top_k_keeps_the_top_probabilities_and_the_rest_mass_exactly(tmp_path):
    logits = toy_logits(1).double()
    path = tmp_path / "sl.safetensors"
    save_soft_labels(path, SoftLabelFile.from_logits(logits.float(), 2, sample_names=NAMES, **INFO))
    rebuilt = torch.softmax(load_soft_labels(path).full_logits().double(), dim=1)
    for row in range(4):  # independently: the two largest classes' probabilities, the others' mean
        probs = [math.exp(v) for v in logits[row].tolist()]
        total = sum(probs)
        order = sorted(range(5), key=lambda k: -probs[k])
        for k in order[:2]:
            assert rebuilt[row, k].item() == pytest.approx(probs[k] / total, rel=1e-5)
        rest = sum(probs[k] for k in order[2:]) / total / 3
        for k in order[2:]:
            assert rebuilt[row, k].item() == pytest.approx(rest, rel=1e-5)


def test_the_lookup_follows_a_selection_by_sample_name():
    logits = toy_logits(2)
    stored = SoftLabelFile.from_logits(logits, 3, sample_names=NAMES, **INFO)
    lookup = SoftLabels(stored, ["s3", "s1"], INFO["class_names"], "sl")
    assert torch.equal(lookup(torch.tensor([1, 0, 1])), stored.full_logits(torch.tensor([1, 3, 1])))
    with pytest.raises(SoftLabelsError) as missing:
        SoftLabels(stored, ["s1", "s9"], INFO["class_names"], "sl")
    assert_one_line_kderror(missing, "sl: 1 of the 2 training samples have no soft labels", "'s9'")
    with pytest.raises(SoftLabelsError) as order:
        SoftLabels(stored, ["s1"], ("b", "a", "c", "d", "e"), "sl")
    assert_one_line_kderror(order, "class names differ", "other order")


def _raw(path: Path, tensors: dict, **meta: str) -> Path:
    good = {"format": "kd-soft-labels", "format_version": "1.0", "num_classes": "5", "num_samples": "4", "top_k": "5",
            "class_names": json.dumps(list(INFO["class_names"])), "dataset": "toy", "data_fingerprint": "fp",
            "teacher_model": "net", "view": "v", "toolkit_version": "0", "created": "2026-01-01T00:00:00Z"}
    names = torch.frombuffer(bytearray("\n".join(NAMES).encode()), dtype=torch.uint8).clone()
    tensors = {name: tensor.contiguous() for name, tensor in {"logits": toy_logits(), "sample_names": names, **tensors}.items()}
    save_file(tensors, str(path), metadata={**good, **meta})
    return path


def _nan() -> torch.Tensor:
    logits = toy_logits()
    logits[2, 1] = math.nan
    return logits


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_bytes(b"not a safetensors file at all"), "not a valid safetensors file"),
    (lambda p: p.write_bytes(_raw(p, {}).read_bytes()[:200]), "not a valid safetensors file"),
    (lambda p: _raw(p, {}, format="lspp-cmatrix"), "not a soft-label file"),
    (lambda p: _raw(p, {}, format_version="2.0"), "format_version '2.0'"),
    (lambda p: _raw(p, {"logits": _nan()}), "non-finite logits for sample 's2'"),
    (lambda p: _raw(p, {"logits": toy_logits()[:3]}), "tensor 'logits' is torch.float32 (3, 5)"),
    (lambda p: _raw(p, {}, num_samples="5"), "tensor 'logits'"),
    (lambda p: _raw(p, {"sample_names": torch.frombuffer(bytearray(b"s0\ns1\ns1\ns3"), dtype=torch.uint8).clone()}), "more than once"),
    (lambda p: _raw(p, {"logits": toy_logits()[:, :2]}, top_k="2"), "tensor 'indices' is missing"),
    (lambda p: _raw(p, {"logits": toy_logits()[:, :2], "indices": torch.full((4, 2), 7), "rest": torch.zeros(4)}, top_k="2"),
     "class indices outside 0..4"),
    (lambda p: _raw(p, {}, class_names='["a", "a", "b", "c", "d"]'), "5 distinct strings"),
])
def test_every_bad_file_is_one_line_and_the_student_run_writes_nothing(tmp_path, make, fragment):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(SoftLabelsError) as error:
        load_soft_labels(path)
    assert_one_line_kderror(error, str(path), fragment)
    out = tmp_path / "student"
    result = kd_in_process("distill", "--soft-labels", str(path), "--dataset", "digits", "--model", "tiny_cnn", "--out", str(out))
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_files_are_readable_by_others_as_the_umask_says(tmp_path):
    old = os.umask(0o027)
    try:
        save_soft_labels(tmp_path / "sl.safetensors", SoftLabelFile.from_logits(toy_logits(), None, sample_names=NAMES, **INFO))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sl.safetensors").stat().st_mode) == 0o640


def test_sample_names_survive_selections(tmp_path):
    digits = load_dataset("digits")
    picked = validation_split(train_per_class(digits, 20, seed=3), 0.25, seed=3)
    names = sample_names(picked.train) + sample_names(picked.val)
    positions = [int(name) for name in names]
    assert len(set(names)) == 200 and all(torch.equal(digits.train.images[p], image) for p, image in
                                          zip(positions, torch.cat([picked.train.images, picked.val.images])))
    folder = load_dataset("imagefolder", make_image_folder(tmp_path / "tree", per_class=4))
    assert sample_names(folder.train)[:2] == ["ant/0.png", "ant/1.png"] and len(sample_names(folder.train)) == 12


# ----------------------------------------------------------------------------- through the command line

# Channels-last would run the live teacher in another memory layout than its stored pass: float rounding apart.
STUDENT = ["--dataset", "digits", "--model", "tiny_cnn", "--epochs", "3", "--augment", "none", "--no-channels-last"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    result = kd_in_process("train-teacher", "--dataset", "digits", "--model", "tiny_cnn", "--epochs", "3", "--out", str(run))
    assert result.returncode == 0, result.stderr
    return run


def test_stored_soft_labels_train_the_student_live_kd_trains_without_augmentation(teacher, tmp_path):
    """Without augmentation the teacher sees what it saw when it stored its labels: the runs agree (dropout too)."""
    stored_file = tmp_path / "sl.safetensors"
    result = kd_in_process("soft-labels", str(teacher), "--out", str(stored_file))
    assert result.returncode == 0 and "1437 training samples (whole rows)" in result.stdout, result.stderr
    for method in (["kd"], ["dkd"], ["dist"], ["kd", "--logit-std", "--temperature", "2", "--kd-weight", "9"]):
        name = "-".join(method)
        live = kd_in_process("distill", "--teacher", str(teacher), "--method", *method, *STUDENT, "--out", str(tmp_path / f"live{name}"))
        stored = kd_in_process("distill", "--soft-labels", str(stored_file), "--method", *method, *STUDENT,
                               "--out", str(tmp_path / f"stored{name}"))
        assert live.returncode == 0 and stored.returncode == 0, (live.stderr, stored.stderr)
        (live_config, live_metrics), (config, metrics) = read_run(tmp_path / f"live{name}"), read_run(tmp_path / f"stored{name}")
        assert config["method"] == live_config["method"] == method[0] and config.get("logit_std", False) == ("--logit-std" in method)
        for part, values in live_metrics["epoch_loss_parts"].items():
            assert metrics["epoch_loss_parts"][part] == pytest.approx(values, rel=1e-5, abs=1e-7), part
        assert config["mode"] == "stored" and config["soft_labels_teacher"] == "tiny_cnn"
        assert metrics["teacher_forward_share"] is None and live_metrics["teacher_forward_share"] > 0
        assert metrics["test_top1"] == pytest.approx(live_metrics["test_top1"]) and metrics["test_top1"] > 0.3
    # A top-k file is another, approximate teacher; a selection of the data finds its rows by name.
    topk_file = tmp_path / "top3.safetensors"
    assert kd_in_process("soft-labels", str(teacher), "--out", str(topk_file), "--top-k", "3").returncode == 0
    assert load_soft_labels(topk_file).top_k == 3
    selected = kd_in_process("distill", "--soft-labels", str(topk_file), *STUDENT, "--train-per-class", "30", "--val-split", "0.2",
                             "--out", str(tmp_path / "selected"))
    assert selected.returncode == 0, selected.stderr


def test_a_file_for_other_data_or_with_a_second_teacher_is_refused(teacher, tmp_path):
    stored_file = tmp_path / "sl.safetensors"
    assert kd_in_process("soft-labels", str(teacher), "--out", str(stored_file)).returncode == 0
    again = kd_in_process("soft-labels", str(teacher), "--out", str(stored_file))
    assert_one_line_error(again, "already exists")
    other = load_soft_labels(stored_file)
    other.data_fingerprint = "digits: 999 train, 360 test"
    save_soft_labels(tmp_path / "other.safetensors", other)
    result = kd_in_process("distill", "--soft-labels", str(tmp_path / "other.safetensors"), *STUDENT, "--out", str(tmp_path / "s"))
    assert_one_line_error(result, "made for other data")
    assert not (tmp_path / "s").exists()
    both = kd_in_process("distill", "--soft-labels", str(stored_file), "--teacher", str(teacher), *STUDENT, "--out", str(tmp_path / "s"))
    assert_one_line_error(both, "are alternatives")
    plain = kd_in_process("distill", "--soft-labels", str(stored_file), "--method", "onehot", *STUDENT, "--out", str(tmp_path / "s"))
    assert_one_line_error(plain, "--method onehot needs")


def test_an_image_folder_is_labelled_by_path(tmp_path):
    tree = make_image_folder(tmp_path / "tree", per_class=5)
    run = tmp_path / "teacher"
    common = ["--dataset", "imagefolder", "--data-dir", str(tree), "--model", "tiny_cnn", "--epochs", "1", "--batch-size", "4"]
    assert kd_in_process("train-teacher", *common, "--out", str(run)).returncode == 0
    stored_file = tmp_path / "sl.safetensors"
    assert kd_in_process("soft-labels", str(run), "--out", str(stored_file)).returncode == 0
    assert sorted(load_soft_labels(stored_file).sample_names) == sorted(f"{c}/{i}.png" for c in ("ant", "bee", "cat") for i in range(5))
    student = kd_in_process("distill", "--soft-labels", str(stored_file), *common, "--out", str(tmp_path / "student"))
    assert student.returncode == 0, student.stderr
    (tree / "train" / "ant" / "0.png").rename(tree / "train" / "ant" / "renamed.png")  # another tree now
    moved = kd_in_process("distill", "--soft-labels", str(stored_file), *common, "--out", str(tmp_path / "student2"))
    assert_one_line_error(moved, "made for other data")
