"""Run directories: what a stage writes and how the next stage reads it back.

A run directory holds `config.json` (everything needed to rebuild the model and re-run),
`model.safetensors` (weights, no pickle), `metrics.json`, and for an LS++ teacher
`cmatrix.safetensors`. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file
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


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run directory, with one-line errors for a missing or broken one."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise KDError(f"run directory not found: {run_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KDError(f"{run_dir} is not a run directory: no {CONFIG_FILE}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise KDError(f"{path}: unreadable ({error})") from None
    missing = [key for key in ("model", "num_classes", "in_channels", "image_size", "class_names") if key not in config]
    if missing:
        raise KDError(f"{path}: missing {', '.join(missing)}")
    return config


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild a run's network from config.json and load model.safetensors (no pickle)."""
    from kd.models import build_model  # rundir is imported by stages that may not need models

    config = read_run_config(run_dir)
    weights = Path(run_dir) / MODEL_FILE
    if not weights.is_file():
        raise KDError(f"{run_dir}: no {MODEL_FILE} (did the run finish?)")
    net = build_model(config["model"], config["num_classes"], config["in_channels"], config["image_size"])
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises several types for corrupt files
        raise KDError(f"{weights}: not a valid safetensors file ({' '.join(str(error).split())[:200]})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise KDError(f"{weights}: weights do not fit model {config['model']!r} ({str(error).splitlines()[0]})") from None
    return net.eval(), config
