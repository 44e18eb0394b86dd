"""Run directories: what a stage writes and how the next stage reads it back.

A run directory holds `config.json` (everything needed to rebuild the model and re-run),
`model.safetensors` (weights, no pickle), `metrics.json`, and for an LS++ teacher
`cmatrix.safetensors`. Every file is written atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from kd.errors import KDError
from kd.io import save_safetensors_atomic

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.safetensors"
CMATRIX_FILE = "cmatrix.safetensors"
ARTIFACTS = (CONFIG_FILE, METRICS_FILE, MODEL_FILE, CMATRIX_FILE)


def prepare_run_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create `out` (or reuse it with `overwrite`), checking it is writable before any training.

    An existing non-empty directory is refused unless `overwrite`; with it, this toolkit's own
    artifacts from the earlier run are removed so none of them is mistaken for this run's.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KDError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise KDError(f"--out {out} already exists and is not empty; pass --overwrite to replace its run, or choose another --out")
        for name in ARTIFACTS:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise KDError(f"cannot write to --out {out}: {error.strerror or error}") from None
    return out


def save_model(path: str | os.PathLike, net: nn.Module) -> None:
    """Network weights as safetensors (tensors cloned so tied weights save without complaint)."""
    state = {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}
    save_safetensors_atomic(path, state)
