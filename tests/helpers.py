"""Helpers shared by more than one test module: import them from here, never from another test module.

Fixtures that several modules use live in tests/conftest.py, which pytest shares without imports.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kd.errors import KDError
from kd.methods import StepContext

# ----------------------------------------------------------------------------- paths and constants

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_ZIP = ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
KD = str(Path(sys.executable).with_name("kd"))  # the installed console script, as a user runs it
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FAST = ["--epochs", "1", "--max-steps", "3", "--batch-size", "16"]
DIGITS = [str(d) for d in range(10)]
CONTEXT = StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1)
# The environment of the `kd` subprocesses that must be reproducible: one thread, so the same kernels
# run in the same order and give bitwise-equal results. tests/conftest.py sets KD_CACHE_DIR before
# it imports this module, so the commands started with ENV use the tests' temporary cache too.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# ----------------------------------------------------------------------------- running `kd`


def kd(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`kd ARGS` through the installed console script, in a subprocess."""
    return subprocess.run([KD, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def kd_in_process(*args: str) -> subprocess.CompletedProcess:
    """`kd ARGS` through the console script's own entry point (`lspp_kd.cli.main:main`), in this process.

    For error paths and short runs: a subprocess would pay 3-5 s of start-up (torch, timm,
    accelerate) per case. An unexpected exception propagates and fails the test, just as a
    traceback would.
    """
    from lspp_kd.cli.main import run_in_process

    return run_in_process(args)


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """(config.json, metrics.json) of a run directory."""
    return json.loads((run_dir / "config.json").read_text()), json.loads((run_dir / "metrics.json").read_text())


def read_summary(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run directory's summary.csv."""
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- one-line errors

# What a user hits with bad input, interrupts and divergence: one line starting "kd: " (an error,
# or "kd: aborted"/"kd: interrupted") under 300 characters, once progress lines are left aside.
SHORT_ERROR = {"prefix": "kd: ", "shorter_than": 300, "ignore": ("\r", "teacher", "student")}


def assert_one_line_error(
    result: subprocess.CompletedProcess, *fragments: str, returncode: int | None = None,
    prefix: str = "kd: error:", shorter_than: int | None = None, ignore: tuple[str, ...] = (),
) -> str:
    """A finished `kd` command that failed with one line on stderr: returns that line.

    Checks a non-zero exit (exactly `returncode` if given), no "Traceback" anywhere on stderr,
    exactly one non-blank stderr line (leaving aside lines that start with one of `ignore`, e.g.
    progress output), that it starts with `prefix`, is shorter than `shorter_than` characters if
    given, and holds every fragment.
    """
    if returncode is None:
        assert result.returncode != 0, (result.stdout, result.stderr)
    else:
        assert result.returncode == returncode, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(ignore)]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(prefix), line
    if shorter_than is not None:
        assert len(line) < shorter_than, line
    for fragment in fragments:
        assert fragment in line, line
    return line


def assert_one_line_kderror(
    error: pytest.ExceptionInfo | BaseException, *fragments: str, error_type: type[BaseException] = KDError,
    prefix: str | None = None, shorter_than: int | None = None, absent: tuple[str, ...] = (),
) -> str:
    """A raised exception (or pytest's ExceptionInfo of one) whose message is one line: returns the message.

    Checks that it is an `error_type` (a KDError unless told), that its message is non-empty, has no
    line break and no surrounding white space, starts with `prefix` and is shorter than
    `shorter_than` characters if given, holds every fragment and none of `absent`.
    """
    exception = error.value if isinstance(error, pytest.ExceptionInfo) else error
    message = str(exception)
    assert isinstance(exception, error_type), repr(exception)
    assert message and message.strip() == message, repr(message)
    assert "\n" not in message and "\r" not in message, repr(message)
    if prefix is not None:
        assert message.startswith(prefix), message
    if shorter_than is not None:
        assert len(message) < shorter_than, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for text in absent:
        assert text not in message, f"{text!r} in {message!r}"
    return message


# ----------------------------------------------------------------------------- data on disk


def make_image_folder(
    root: Path, mode: str = "RGB", classes: tuple[str, ...] = ("ant", "bee", "cat"),
    per_class: int = 6, size: int = 12, splits: tuple[str, ...] = ("train", "test"),
) -> Path:
    """An ImageFolder tree whose classes differ in brightness, so a model can learn them."""
    rng = np.random.default_rng(0)
    channels = 1 if mode == "L" else 3
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = 40 + 80 * index
                pixels = np.clip(base + rng.normal(0, 20, (size, size, channels)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / f"{i}.png")
    return root


def write_image(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path) if mode else Image.fromarray(pixels).save(path)


def make_tree(root: Path, mode: str = "RGB", classes=("cat", "ant", "bee"), per_class: int = 3, size: int = 6,
              test_name: str = "test") -> dict[str, int]:
    """A tree whose every image of class k is filled with the value 30 + 60 * k (k in creation order)."""
    values = {}
    for k, name in enumerate(classes):
        values[name] = 30 + 60 * k
        for split in ("train", test_name):
            for i in range(per_class):
                shape = (size, size) if mode == "L" else (size, size, 3)
                pixels = np.full(shape, values[name], dtype=np.uint8)
                pixels[0, 0] = 255  # not constant, so std is not zero
                write_image(root / split / name / f"{i:03d}.png", pixels, "L" if mode == "L" else "RGB")
    return values


def extract_cifar10_subset(dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """The first N images of each class of the shared CIFAR-10 JPEG copy, as an ImageFolder tree."""
    if not CIFAR10_ZIP.exists():
        pytest.skip(f"CIFAR-10 copy not found at {CIFAR10_ZIP}")
    wanted = {"train": train_per_class, "test": test_per_class}
    taken: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(CIFAR10_ZIP) as archive:
        for info in archive.infolist():
            parts = Path(info.filename).parts
            if info.is_dir() or len(parts) < 3 or parts[-3] not in wanted:
                continue
            split, label = parts[-3], parts[-2]
            if taken.get((split, label), 0) >= wanted[split]:
                continue
            taken[(split, label)] = taken.get((split, label), 0) + 1
            target = dest / split / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
    return dest


def hand_made_run(run: Path, **config) -> Path:
    """A run directory with an untrained small_cnn on digits and a config.json: no training needed."""
    from kd.models.networks import build_model
    from kd.training.rundir import save_model

    torch.manual_seed(0)
    net = build_model("small_cnn", 10, 1, 8)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(2.0)  # predictions far from uniform, so the images averaged over matter
    run.mkdir(parents=True)
    save_model(run / "model.safetensors", net)
    config = {"model": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8, "class_names": DIGITS,
              "dataset": "digits", "seed": 3, **config}
    (run / "config.json").write_text(json.dumps(config))
    return run


class PickleTrap:
    """Unpickling this runs code that creates `marker` (what a malicious file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- tensors and models


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def reference_cmatrix(c_logits: torch.Tensor) -> torch.Tensor:
    """C (K x K): each row a softmax over the K-1 non-target classes, a 0 inserted at the target."""
    k = c_logits.shape[0]
    rows = torch.softmax(c_logits, dim=1)
    return torch.stack([torch.cat([rows[y, :y], rows.new_zeros(1), rows[y, y:]]) for y in range(k)])


def evaluate_in_one_process(net: torch.nn.Module, data, split: str) -> dict[str, float]:
    """Top-1 and NLL of `net` over a whole split, in this one process, and how many images it holds."""
    from kd.data.loader import DeviceBatches
    from kd.reports.metrics import classification_metrics

    logits, labels = [], []
    with torch.no_grad():
        for images, batch_labels, valid, _ in DeviceBatches(data, split, 100, torch.device("cpu")):
            assert valid.all()
            logits.append(net(images))
            labels.append(batch_labels)
    return classification_metrics(torch.cat(logits), torch.cat(labels)) | {"count": len(torch.cat(labels))}


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found += children
        queue += children
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants at once, and wait until they are gone."""
    victims = [process.pid, *descendants(process.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text() for pid in victims[1:]):
        time.sleep(0.01)


def start_and_kill_after_first_checkpoint(args: list[str], out: Path, launcher: tuple[str, ...] = ()) -> bool:
    """Start `kd ...` (under `launcher`, e.g. torchrun) and SIGKILL it, with every process it
    started, as soon as its first checkpoint is complete; False if it finished first."""
    from kd.training.rundir import latest_checkpoint

    process = subprocess.Popen([*launcher, KD, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if latest_checkpoint(out) is not None:
                kill_tree(process)
                break
            time.sleep(0.005)
        return process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            kill_tree(process)
