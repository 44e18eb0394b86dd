"""What a GPU run relies on that the CPU can check: float32 targets and losses under mixed precision
(bf16 autocast runs on the CPU too), host-side randomness for host-side decisions, and the
mixed precision `accelerate launch` asks for."""

from __future__ import annotations

import math

import pytest
import torch

from kd.cmatrix.artifact import CMatrix
from kd.losses import LSPPLoss, ProxyTeacherLoss, mix_targets
from kd.methods import build_method
from kd.methods.base import StepContext

K = 10


def label_distributions(n: int = 16) -> torch.Tensor:
    """Mixup-style label distributions: lam * onehot(y) + (1 - lam) * onehot(y') with lam in (0, 1)."""
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, K, (n,), generator=generator), torch.randint(0, K, (n,), generator=generator)
    lam = torch.rand(n, 1, generator=generator)
    return lam * torch.eye(K)[first] + (1 - lam) * torch.eye(K)[second]


def cmatrix() -> CMatrix:
    generator = torch.Generator().manual_seed(1)
    return CMatrix.from_logits(torch.randn(K, K - 1, generator=generator), class_names=[f"c{i}" for i in range(K)], alpha=0.3)


@pytest.mark.parametrize("targets", ["labels", "distributions"])
def test_proxy_targets_are_float32_and_exact_under_bf16_autocast(targets):
    given = torch.arange(16) % K if targets == "labels" else label_distributions()
    matrix, alpha = cmatrix(), 0.3
    soft = given.double() if given.dim() == 2 else torch.eye(K, dtype=torch.float64)[given]
    expected = (1 - alpha) * soft + alpha * soft @ matrix.probs.double()  # float64, by hand
    with torch.autocast("cpu", dtype=torch.bfloat16):
        library = mix_targets(given, matrix.probs, alpha)
        public = ProxyTeacherLoss(matrix).targets(given)
    for made in (library, public):
        assert made.dtype == torch.float32
        torch.testing.assert_close(made.double(), expected, rtol=1e-6, atol=1e-7)


def test_loss_values_are_float32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(16, K, generator=generator)
    context = StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1)
    proxy = build_method("proxy", K, cmatrix=cmatrix())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [proxy(logits, label_distributions(), context)["loss"], LSPPLoss(K)(logits, label_distributions())]
    reference = [proxy(logits, label_distributions(), context)["loss"], LSPPLoss(K)(logits, label_distributions())]
    for loss, exact in zip(losses, reference):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, exact, rtol=1e-6, atol=1e-7)


def test_mixed_precision_not_given_is_accelerate_launchs_and_is_recorded(tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION; without the flag the run uses it."""
    import json

    from lspp_kd.cli.main import run_in_process

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    fast = ["--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--model", "tiny_cnn"]
    assert run_in_process(["train-teacher", "--out", str(tmp_path / "launched"), *fast]).returncode == 0
    assert run_in_process(["train-teacher", "--out", str(tmp_path / "flag"), "--mixed-precision", "no", *fast]).returncode == 0
    recorded = {name: json.loads((tmp_path / name / "config.json").read_text())["mixed_precision"] for name in ("launched", "flag")}
    assert recorded == {"launched": "bf16", "flag": "no"}
    assert json.loads((tmp_path / "launched" / "metrics.json").read_text())["mixed_precision"] == "bf16"


def test_host_side_augmentation_draws_come_from_the_host_generator():
    """RandAugment's op choices and Mixup/CutMix's lam and box steer Python code: drawing them from a GPU
    generator would cost a device-to-host sync every batch. They come from the host generator; the
    per-pixel draws (crop, flip) from the device one."""
    from kd.data.augment import AugmentOptions, build_pipeline
    from kd.data.loader import Normalize

    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(8) % K
    for names, host_draws, device_draws in ((("randaugment",), True, False), (("mixup", "cutmix"), True, False),
                                            (("crop", "flip"), False, True)):
        device, host = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        before = device.get_state(), host.get_state()
        pipeline = build_pipeline(AugmentOptions(names), image_size=16, num_classes=K, generator=device,
                                  host_generator=host, normalize=Normalize((0.5,) * 3, (0.25,) * 3, torch.device("cpu")))
        pipeline(images, labels)
        assert (not torch.equal(host.get_state(), before[1])) == host_draws, names
        assert (not torch.equal(device.get_state(), before[0])) == device_draws, names


class _PidSamples(torch.utils.data.Dataset):
    """A streamed split whose label is the process that read the sample."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        import os

        return torch.zeros(3, 8, 8, dtype=torch.uint8), os.getpid()


def test_streamed_training_data_keeps_its_worker_processes_across_epochs():
    """--num-workers N: the training DataLoader's workers start once, not at every epoch; `close` stops them."""
    import os

    from kd.data.datasets import ImageDataset
    from kd.data.loader import DeviceBatches

    data = ImageDataset(name="pids", class_names=["a"], channels=3, image_size=8, train=_PidSamples(), test=_PidSamples(),
                        in_memory=False, default_augment=(), mean=(0.5,) * 3, std=(0.25,) * 3)
    batches = DeviceBatches(data, "train", 4, torch.device("cpu"), num_workers=2)
    readers = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        readers.append({int(pid) for _, pids, _, _ in batches for pid in pids})
    assert readers[0] == readers[1] == readers[2] and len(readers[0]) == 2 and os.getpid() not in readers[0]
    batches.close()
    batches.set_epoch(3)
    assert {int(pid) for _, pids, _, _ in batches for pid in pids}.isdisjoint(readers[0])  # new workers after close
    batches.close()
    in_process = DeviceBatches(data, "train", 4, torch.device("cpu"), num_workers=0)
    assert {int(pid) for _, pids, _, _ in in_process for pid in pids} == {os.getpid()}


def test_a_step_the_fp16_scaler_skips_does_not_advance_the_schedule(monkeypatch, fresh_accelerate_state):
    """fp16's gradient scaler skips steps whose gradients overflowed; the learning-rate schedule must not move then."""
    from accelerate import Accelerator

    from kd.data.datasets import load_dataset
    from kd.models.networks import build_model
    from kd.training.loop import TrainModule, fit, make_accelerator
    from kd.training.settings import Settings

    def lrs(skipped: bool) -> list[float]:
        monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: skipped))
        torch.manual_seed(0)
        module = TrainModule(build_model("tiny_cnn", 10, 1, 8), build_method("onehot", 10))
        settings = Settings(epochs=2, batch_size=512, lr=0.1, max_steps=6)
        result = fit(module, load_dataset("digits"), settings, make_accelerator(), evaluate=False, warmup_fraction=0.0)
        return [row["lr"] for row in result.summary]

    assert lrs(skipped=True) == [0.1, 0.1]  # each epoch's last step still at the schedule's first value
    moving = lrs(skipped=False)
    assert 0.1 > moving[0] > moving[1]


def test_num_workers_is_a_checked_recorded_setting(tmp_path):
    from tests.helpers import assert_one_line_error, kd_in_process

    fast = ["--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--model", "tiny_cnn"]
    assert kd_in_process("train-teacher", "--out", str(tmp_path / "run"), "--num-workers", "0", *fast).returncode == 0
    import json

    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_workers"] == 0
    assert_one_line_error(kd_in_process("train-teacher", "--out", str(tmp_path / "bad"), "--num-workers", "-1", *fast),
                          "--num-workers must be a whole number >= 0, got -1")


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_the_gpu_form_of_lspp_soft_targets_equals_the_cpu_form(alpha):
    """On a GPU, LS++'s log(s @ C) for label distributions is one matrix product (no torch.nonzero, no
    device sync); on the CPU a logsumexp over the batch's classes. Same values and C gradients."""
    from kd.losses.functional import _log_mixed, _log_mixed_by_product, log_cmatrix_from_logits

    soft = torch.cat([label_distributions(), torch.eye(K)[:3]])  # one-hot rows meet C's zero diagonal
    results = []
    for by_product in (False, True):
        c_logits = torch.randn(K, K - 1, generator=torch.Generator().manual_seed(4), requires_grad=True)
        log_c = log_cmatrix_from_logits(c_logits)
        mixed = _log_mixed_by_product(soft, log_c) if by_product else _log_mixed(soft, soft.log(), log_c)
        weights = torch.rand(mixed.shape, generator=torch.Generator().manual_seed(5))
        log_t = torch.logaddexp(soft.log() + math.log1p(-alpha), mixed + math.log(alpha))
        (weights * log_t.exp()).sum().backward()
        results.append((log_t.exp().detach(), c_logits.grad))
    assert torch.isfinite(results[1][1]).all()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)
