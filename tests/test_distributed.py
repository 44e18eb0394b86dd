"""Scaling under Accelerate on the CPU: two processes (torchrun, gloo), gradient accumulation,
mixed precision, and the GPU benchmark's command run for a few steps."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from kd.cmatrix.artifact import load_cmatrix
from kd.data.datasets import load_dataset
from kd.data.splits import validation_split
from kd.training.loop import TrainModule, fit, make_accelerator
from kd.data.loader import DeviceBatches
from kd.methods import StepContext, build_method
from kd.models.networks import build_model
from kd.training.rundir import load_run_model
from kd.training.settings import Settings
from tests.helpers import (
    ENV, KD, ROOT, TORCHRUN, assert_one_line_error, evaluate_in_one_process, free_port, kd, read_run, read_summary,
)


def torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(ENV)
    env.pop("ACCELERATE_USE_CPU", None)  # the toolkit must pick the CPU backend by itself
    command = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


# ----------------------------------------------------------------------------- two processes


def test_two_process_library_run_keeps_ranks_identical_and_shards_the_data(tmp_path):
    result = torchrun("tests/ddp_worker.py", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]

    def load(mode: str) -> tuple[list[dict], list[dict]]:
        reports = [json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in range(2)]
        tensors = [load_file(str(tmp_path / f"{mode}-rank{r}.safetensors")) for r in range(2)]
        return reports, tensors

    reports, tensors = load("sync")
    assert reports[0]["world_size"] == 2 and reports[0]["backend"] == "gloo"
    assert reports[0]["distributed_type"].endswith("MULTI_CPU")
    assert reports[0]["steps"] == 2 * reports[0]["steps_per_epoch"] == 12

    # Identical network weights and an identical C-matrix on every rank, and C actually moved.
    assert tensors[0].keys() == tensors[1].keys()
    for name in tensors[0]:
        assert torch.equal(tensors[0][name], tensors[1][name]), name
    assert tensors[0]["cmatrix_logits"].abs().max() > 1e-3

    # Sharding: in every epoch the ranks trained on disjoint parts that together cover the data,
    # and the epoch order changes between epochs.
    for epoch in range(2):
        mine, theirs = reports[0]["seen"][epoch], reports[1]["seen"][epoch]
        assert len(mine) == len(theirs) == 48
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == list(range(96))
    assert reports[0]["seen"][0] != reports[0]["seen"][1]

    # Metrics are gathered over all ranks: both report the whole test split's numbers, which
    # differ from what rank 0's own shard alone would give.
    for report in reports:
        gathered, whole = report["gathered_metrics"], report["single_process_metrics"]
        for name in ("top1", "nll", "ece", "mean_confidence"):
            assert gathered[f"test_{name}"] == pytest.approx(whole[name], rel=1e-6, abs=1e-9)
    assert reports[0]["gathered_metrics"]["test_nll"] != pytest.approx(reports[0]["own_shard_metrics"]["nll"], rel=1e-6)

    # Control: the same run with DDP told to skip the C logits leaves the ranks' C-matrices
    # different (while the network, still synchronised, stays identical).
    reports, tensors = load("nosync")
    assert not torch.allclose(tensors[0]["cmatrix_logits"], tensors[1]["cmatrix_logits"], atol=1e-4)
    for name in tensors[0]:
        if name != "cmatrix_logits":
            assert torch.equal(tensors[0][name], tensors[1][name]), name

    # OLS: both ranks swap in the same matrix, made from the sum of both ranks' statistics of
    # the last epoch (each rank's own statistics differ, and neither alone gives the matrix).
    _, tensors = load("ols")
    assert torch.equal(tensors[0]["soft_labels"], tensors[1]["soft_labels"])
    for name in tensors[0]:
        if not name.startswith("local_sums"):
            assert torch.equal(tensors[0][name], tensors[1][name]), name
    last = tensors[0]["local_sums_epoch1"] + tensors[1]["local_sums_epoch1"]
    assert not torch.equal(tensors[0]["local_sums_epoch1"], tensors[1]["local_sums_epoch1"])
    sums, counts = last[:, :-1], last[:, -1]
    expected = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], torch.full_like(sums, 1 / sums.shape[0]))
    assert (counts > 0).any() and (tensors[0]["local_sums_epoch1"][:, -1] < counts).any()
    torch.testing.assert_close(tensors[0]["soft_labels"], expected, rtol=1e-6, atol=1e-7)


def test_two_process_cli_run_writes_one_run_directory_with_gathered_metrics(tmp_path):
    out = tmp_path / "ddp"
    result = torchrun("--no-python", KD, "train-teacher", "--out", str(out), "--epochs", "2", "--batch-size", "32",
                      "--checkpoint-every", "1", "--val-split", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    # Only the main process writes files and prints the summary.
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors", "cmatrix.safetensors", "config.json", "metrics.json", "summary.csv", "checkpoints",
    }
    assert result.stdout.count("test top-1") == 1
    assert not list(out.rglob(".*"))  # no temporary files left behind
    data = validation_split(load_dataset("digits"), 0.2, seed=0)
    steps_per_epoch = len(data.train) // 2 // 32  # each process sees half of each epoch
    checkpoint = out / "checkpoints" / f"step-{steps_per_epoch:08d}"
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin"} <= {p.name for p in checkpoint.iterdir()}

    config, metrics = read_run(out)
    assert metrics["world_size"] == config["world_size"] == 2
    assert config["effective_batch_size"] == 64
    assert metrics["steps"] == 2 * steps_per_epoch
    assert metrics["device"].startswith("cpu")
    load_cmatrix(out / "cmatrix.safetensors", expected_class_names=metrics["class_names"])

    # The reported test and validation metrics are the whole splits': evaluate the saved model in one process.
    net, _ = load_run_model(out)
    for split, count in (("test", 360), ("val", len(data.val))):
        whole = evaluate_in_one_process(net, data, split)
        assert whole["count"] == count
        assert metrics[f"{split}_top1"] == whole["top1"]
        assert metrics[f"{split}_nll"] == pytest.approx(whole["nll"], rel=1e-5)
    rows = read_summary(out)
    assert [int(row["epoch"]) for row in rows] == [1, 2] and all(row["val_top1"] for row in rows)
    assert float(rows[-1]["val_top1"]) == pytest.approx(metrics["val_top1"], rel=1e-6)


# ----------------------------------------------------------------------------- gradient accumulation


def _one_run(data, batch_size: int, grad_accum: int, steps: int) -> dict[str, torch.Tensor]:
    accelerator = make_accelerator(grad_accum=grad_accum)
    torch.manual_seed(0)
    net = build_model("lenet_padded", data.num_classes, data.channels, data.image_size)  # no BatchNorm, no dropout
    module = TrainModule(net, build_method("lspp", data.num_classes, alpha=0.2))
    settings = Settings(epochs=1, batch_size=batch_size, lr=0.2, weight_decay=5e-4, seed=0, max_steps=steps)
    result = fit(module, data, settings, accelerator, evaluate=False)
    assert result.steps == steps and result.grad_accum == grad_accum
    assert result.effective_batch_size == 64
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_grad_accumulation_matches_a_larger_batch(fresh_accelerate_state):
    # No augmentation randomness: with it, two half batches would draw different crops.
    data = replace(load_dataset("digits"), default_augment=())
    accumulated = _one_run(data, batch_size=32, grad_accum=2, steps=3)
    large = _one_run(data, batch_size=64, grad_accum=1, steps=3)
    initial = _one_run(data, batch_size=64, grad_accum=1, steps=1)
    assert accumulated.keys() == large.keys() and "criterion.logits" in accumulated
    for name in accumulated:
        assert torch.allclose(accumulated[name], large[name], rtol=1e-5, atol=1e-6), name
    # ...and the comparison is not vacuous: three steps moved the weights and the C logits.
    assert not torch.allclose(large["criterion.logits"], initial["criterion.logits"], atol=1e-6)
    assert large["criterion.logits"].abs().max() > 1e-4


def test_grad_accum_flag_is_recorded_and_checked(tmp_path):
    out = tmp_path / "accum"
    result = kd("train-teacher", "--out", str(out), "--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--grad-accum", "4")
    assert result.returncode == 0, result.stderr
    config, metrics = read_run(out)
    assert config["grad_accum"] == metrics["grad_accum"] == 4
    assert config["effective_batch_size"] == metrics["effective_batch_size"] == 64
    assert metrics["steps"] == 3
    assert_one_line_error(kd("train-teacher", "--out", str(tmp_path / "x"), "--grad-accum", "0"), "--grad-accum")
    assert_one_line_error(kd("train-teacher", "--out", str(tmp_path / "y"), "--grad-accum", "1000", "--batch-size", "64"), "--grad-accum")


# ----------------------------------------------------------------------------- mixed precision


def test_bf16_keeps_the_lspp_loss_and_c_matrix_in_float32(fresh_accelerate_state):
    accelerator = make_accelerator("bf16")
    data = load_dataset("digits")
    net = build_model("small_cnn", data.num_classes, data.channels, data.image_size)
    module = accelerator.prepare(TrainModule(net, build_method("lspp", data.num_classes)))
    images, labels, _, _ = next(iter(DeviceBatches(data, "train", 16, accelerator.device)))
    seen = []
    net.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    parts = module(images, labels, StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1))
    loss = parts["loss"]
    assert seen == [torch.bfloat16]  # the network's forward really ran in autocast
    assert all(part.dtype == torch.float32 for part in parts.values())
    accelerator.backward(loss)
    criterion = accelerator.unwrap_model(module).criterion
    assert criterion.logits.dtype == torch.float32 and criterion.logits.grad.dtype == torch.float32


@pytest.mark.parametrize("stage", ["train-teacher", "distill"])
def test_bf16_runs_complete_and_fp16_on_cpu_is_a_one_line_error(tmp_path, stage):
    out = tmp_path / "bf16"
    result = kd(stage, "--out", str(out), "--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--mixed-precision", "bf16")
    assert result.returncode == 0, result.stderr
    _, metrics = read_run(out)
    assert metrics["mixed_precision"] == "bf16" and 0.0 <= metrics["test_top1"] <= 1.0
    if stage == "train-teacher":
        cmatrix = load_cmatrix(out / "cmatrix.safetensors")
        assert cmatrix.probs.dtype == torch.float32 and cmatrix.logits.dtype == torch.float32
    if not torch.cuda.is_available():
        assert_one_line_error(kd(stage, "--out", str(tmp_path / "fp16"), "--mixed-precision", "fp16"), "fp16", "bf16")


# ----------------------------------------------------------------------------- the GPU benchmark's command


def test_gpu_teacher_epoch_benchmark_runs_a_few_steps_on_cpu(tmp_path, cifar10_subset):
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_teacher_epoch.py", "--data-dir", str(cifar10_subset), "--max-steps", "2",
         "--batch-size", "16", "--results-dir", str(tmp_path), "--mixed-precision", "bf16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_teacher_epoch.json").read_text())
    assert report["steps"] == 2 and report["model"] == "cifar_resnet18" and report["mixed_precision"] == "bf16"
    assert report["images_per_second"] > 0 and report["peak_memory_mb"] > 0 and report["device"].startswith("cpu")
    assert "kd train-teacher" in report["kd_command"] and "--model cifar_resnet18" in report["kd_command"]
    markdown = (tmp_path / "gpu_teacher_epoch.md").read_text()
    assert "images/s" in markdown and "benchmarks/gpu_teacher_epoch.py" in markdown
