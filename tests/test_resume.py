"""Checkpoint and resume: a SIGKILLed run continued with --resume ends bitwise where an
uninterrupted run ends; checkpoints are complete or absent; bad resumes are one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kd.data.datasets import load_dataset
from kd.errors import KDError
from kd.training.loop import TrainModule, fit, make_accelerator
from kd.methods import build_method
from kd.models.networks import build_model
from kd.training.rundir import latest_checkpoint, list_checkpoints
from kd.training.settings import Settings
from tests.helpers import (
    ENV, KD, TORCHRUN, assert_bitwise_equal, assert_one_line_error, free_port, kd, kd_in_process, read_run,
    read_summary, start_and_kill_after_first_checkpoint, tensors,
)

# small_cnn has BatchNorm and dropout, digits has random crops: every random stream is exercised.
# Checkpoints every epoch (44 steps) and every 30 steps, so the kill usually lands after a
# mid-epoch checkpoint and resuming has to skip part of an epoch.
RUN = ["--batch-size", "32", "--checkpoint-every", "1", "--checkpoint-every-steps", "30"]


def run_kd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([KD, *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.parametrize("stage,method", [("train-teacher", "lspp"), ("train-teacher", "ols"), ("distill", "ls")])
def test_killed_run_resumes_to_the_same_weights_and_cmatrix(tmp_path, stage, method):
    """OLS: its matrix (in the model state) and its per-process accumulators (in the train state)."""
    extra = ["--method", method]
    for epochs in ("4", "12", "40"):  # more epochs if the run outpaced the kill
        killed = tmp_path / f"killed-{epochs}"
        args = [stage, "--epochs", epochs, *RUN, *extra]
        if start_and_kill_after_first_checkpoint([*args, "--out", str(killed)], killed):
            break
    else:
        pytest.fail("every run finished before it could be killed; the test proves nothing")

    # The kill left an unfinished run: no final artifacts, at least one complete checkpoint.
    assert not (killed / "model.safetensors").exists() and not (killed / "metrics.json").exists()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None

    result = run_kd(*args, "--out", str(killed), "--resume")
    assert result.returncode == 0, result.stderr
    reference = tmp_path / "uninterrupted"
    result = run_kd(*args, "--out", str(reference))
    assert result.returncode == 0, result.stderr

    _, metrics = read_run(killed)
    _, expected = read_run(reference)
    steps = int(epochs) * (1437 // 32)
    assert 0 < metrics["resumed_from_step"] < steps == metrics["steps"] == expected["steps"]
    assert expected["resumed_from_step"] is None
    assert_bitwise_equal(tensors(killed / "model.safetensors"), tensors(reference / "model.safetensors"))
    if stage == "train-teacher":  # the C-matrix (LS++'s or OLS's): probabilities and logits
        assert_bitwise_equal(tensors(killed / "cmatrix.safetensors"), tensors(reference / "cmatrix.safetensors"))
    assert metrics["epoch_loss_parts"] == expected["epoch_loss_parts"]
    for name in ("test_top1", "test_nll", "test_ece"):
        assert metrics[name] == expected[name]
    # The last two checkpoints are kept, nothing unfinished is left behind.
    names = [p.name for p in (killed / "checkpoints").iterdir()]
    assert len(names) == 2 and all(name.startswith("step-") for name in names)


@pytest.mark.parametrize("method,augment", [
    ("lspp", "crop"), ("ols", "crop"), ("lspp", "crop,flip,cutout,randaugment,mixup,cutmix"),
], ids=["lspp", "ols", "lspp-every-augmentation"])
def test_mid_epoch_checkpoint_resumes_bitwise(tmp_path, method, augment):
    """Deterministic counterpart of the kill test: resume from a checkpoint 16 steps into epoch 2
    (for OLS: with half an epoch of statistics accumulated; with every augmentation: each drawing
    from the saved generator)."""
    reference = tmp_path / "reference"
    args = ["train-teacher", "--method", method, "--augment", augment, "--epochs", "2", *RUN]
    assert run_kd(*args, "--out", str(reference)).returncode == 0
    assert [p.name for p in list_checkpoints(reference)] == ["step-00000060", "step-00000088"]

    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "config.json", copy / "config.json")
    shutil.copytree(reference / "checkpoints" / "step-00000060", copy / "checkpoints" / "step-00000060")
    # An unfinished save (a crash mid-write) must be ignored, and cleaned up by the next save.
    partial = copy / "checkpoints" / ".tmp-step-00000070"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    # The killed run had written summary.csv rows past its last checkpoint: resuming drops them.
    (copy / "summary.csv").write_text("epoch,step,train_loss\n1,44,9.0\n2,88,9.0\n3,132,9.0\n")

    result = run_kd(*args, "--out", str(copy), "--resume")
    assert result.returncode == 0, result.stderr
    assert read_run(copy)[1]["resumed_from_step"] == 60
    assert_bitwise_equal(tensors(copy / "model.safetensors"), tensors(reference / "model.safetensors"))
    assert_bitwise_equal(tensors(copy / "cmatrix.safetensors"), tensors(reference / "cmatrix.safetensors"))
    assert read_run(copy)[1]["epoch_loss_parts"] == read_run(reference)[1]["epoch_loss_parts"]
    assert not partial.exists()
    timing = ("images_per_second", "train_seconds")
    assert [{k: v for k, v in row.items() if k not in timing} for row in read_summary(copy)] == [
        {k: v for k, v in row.items() if k not in timing} for row in read_summary(reference)
    ]
    assert [row["epoch"] for row in read_summary(copy)] == ["1", "2"]


def test_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = make_accelerator()
    data = load_dataset("digits")
    module = TrainModule(build_model("tiny_cnn", 10, 1, 8), build_method("lspp", 10))
    settings = Settings(epochs=3, batch_size=64, lr=0.05, weight_decay=5e-4, checkpoint_every=1)

    real_save_state = accelerator.save_state
    calls = []

    def crash_on_second_save(output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir, "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")
        return real_save_state(output_dir, **kwargs)

    monkeypatch.setattr(accelerator, "save_state", crash_on_second_save)
    with pytest.raises(KDError, match="disk full .writing checkpoint step-00000044.; step-00000022 is complete"):
        fit(module, data, settings, accelerator, run_dir=tmp_path, evaluate=False)
    first = tmp_path / "checkpoints" / "step-00000022"
    assert [p.name for p in list_checkpoints(tmp_path)] == [first.name]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]  # the partial save removed
    assert latest_checkpoint(tmp_path) == first
    assert len(load_file(str(first / "model.safetensors"))) > 0  # complete and loadable
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_resume_problems_are_one_line_errors(tmp_path):
    out = tmp_path / "run"
    fast = ["--epochs", "1", "--max-steps", "3", "--batch-size", "16"]
    assert_one_line_error(kd_in_process("train-teacher", "--out", str(tmp_path / "absent"), "--resume", *fast), "--resume", "no run")
    assert kd("train-teacher", "--out", str(out), *fast).returncode == 0
    assert_one_line_error(kd_in_process("train-teacher", "--out", str(out), "--resume", *fast), "no complete checkpoint")
    assert kd("train-teacher", "--out", str(out), "--overwrite", "--checkpoint-every", "1", *fast).returncode == 0
    assert [p.name for p in list_checkpoints(out)] == ["step-00000003"]
    assert_one_line_error(kd_in_process("train-teacher", "--out", str(out), "--resume", "--overwrite", *fast), "--resume", "--overwrite")
    assert_one_line_error(kd_in_process("train-teacher", "--out", str(out), "--resume", "--seed", "7", *fast), "--seed", "7", "0")
    assert_one_line_error(kd_in_process("train-teacher", "--out", str(out), "--resume", "--model", "tiny_cnn", *fast), "--model", "tiny_cnn")
    # A finished run resumes from its final checkpoint: nothing left to train, same artifacts.
    before = tensors(out / "model.safetensors")
    result = kd("train-teacher", "--out", str(out), "--resume", *fast)
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal(before, tensors(out / "model.safetensors"))
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 3


def test_killed_two_process_run_resumes_to_the_same_weights_and_cmatrix(tmp_path):
    """Under torchrun every rank restores its own augmentation and dropout streams."""
    def launcher() -> tuple[str, ...]:
        return (TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--no-python")

    args = ["train-teacher", "--epochs", "6", *RUN]
    killed = tmp_path / "killed"
    if not start_and_kill_after_first_checkpoint([*args, "--out", str(killed)], killed, launcher()):
        pytest.fail("the two-process run finished before it could be killed; the test proves nothing")
    assert not (killed / "model.safetensors").exists()
    steps = 6 * (1437 // 2 // 32)
    for out, resume in ((killed, ["--resume"]), (tmp_path / "uninterrupted", [])):
        result = subprocess.run([*launcher(), KD, *args, "--out", str(out), *resume],
                                capture_output=True, text=True, timeout=300, env=ENV)
        assert result.returncode == 0, result.stderr[-2000:]
    _, metrics = read_run(killed)
    _, expected = read_run(tmp_path / "uninterrupted")
    assert metrics["world_size"] == expected["world_size"] == 2
    assert 0 < metrics["resumed_from_step"] < steps == metrics["steps"] == expected["steps"]
    assert_bitwise_equal(tensors(killed / "model.safetensors"), tensors(tmp_path / "uninterrupted" / "model.safetensors"))
    assert_bitwise_equal(tensors(killed / "cmatrix.safetensors"), tensors(tmp_path / "uninterrupted" / "cmatrix.safetensors"))
    assert metrics["epoch_train_loss"] == expected["epoch_train_loss"]
