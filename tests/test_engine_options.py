"""Speed options that must not change results beyond float tolerance: channels-last memory format, torch.compile."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from kd.data.datasets import load_dataset
from kd.training.loop import TrainModule, fit, make_accelerator
from kd.training.settings import Settings
from kd.methods import build_method
from kd.models.networks import build_model
from tests.helpers import kd_in_process


def _train(channels_last: bool) -> TrainModule:
    torch.manual_seed(0)
    data = load_dataset("digits")
    module = TrainModule(build_model("small_cnn", 10, 1, 8), build_method("lspp", 10))
    settings = Settings(epochs=1, batch_size=64, lr=0.05, weight_decay=5e-4, max_steps=6, channels_last=channels_last)
    fit(module, data, settings, make_accelerator(), evaluate=False)
    return module


def test_channels_last_trains_to_the_same_weights_within_float_tolerance(fresh_accelerate_state):
    nhwc, nchw = _train(True), _train(False)
    conv = next(part for part in nhwc.net.modules() if isinstance(part, torch.nn.Conv2d) and part.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    for (name, a), (_, b) in zip(nhwc.state_dict().items(), nchw.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_flag_runs_and_keeps_parameter_names(tmp_path):
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    # The paper's LeNet has no dropout: compiled graphs draw dropout masks from another generator.
    args = ["train-teacher", "--model", "lenet", "--image-size", "32", "--max-steps", "3", "--batch-size", "32"]
    assert kd_in_process(*args, "--out", str(plain)).returncode == 0
    result = kd_in_process(*args, "--compile", "--out", str(compiled))
    assert result.returncode == 0, result.stderr
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(compiled / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
