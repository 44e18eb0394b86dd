"""Shared fixtures: a finished digits teacher, a slice of the real CIFAR-10 copy, a clean Accelerate state.

Shared functions and constants are in tests/helpers.py.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The decoded-data cache (kd.data.cache) of every test, and of the commands they start, goes
# into one temporary folder, not the user's ~/.cache. Set before tests.helpers is imported: its
# ENV, the environment of the commands some tests start, copies os.environ.
_CACHE = tempfile.mkdtemp(prefix="kd-test-cache-")
os.environ["KD_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

from tests.helpers import extract_cifar10_subset, kd_in_process  # noqa: E402 - after KD_CACHE_DIR is set


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A finished LS++ teacher run on digits (20 steps; it has a cmatrix.safetensors). Shared: copy it before changing it."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    result = kd_in_process("train-teacher", "--out", str(out), "--epochs", "1", "--max-steps", "20", "--batch-size", "32")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def cifar10_subset(tmp_path_factory) -> Path:
    return extract_cifar10_subset(tmp_path_factory.mktemp("cifar10"), train_per_class=20, test_per_class=10)


@pytest.fixture
def fresh_accelerate_state():
    """In-process Accelerators: start from and leave behind a clean Accelerate state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
