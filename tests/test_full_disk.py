"""A full disk under a run (issue 23): one line naming what was being written, no temporary left,
the last complete checkpoint intact, and `--resume` finishing bitwise once there is space.

The disk is a small tmpfs the test mounts, so these run as root (as CI does) and are skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, kd_in_process, tensors

PROGRESS = ("\r", "teacher")  # the progress bar's lines
RUN = ["train-teacher", "--dataset", "digits", "--model", "tiny_cnn", "--epochs", "3", "--checkpoint-every", "1"]


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as out:
        out.truncate(0)
        out.write(b"\0" * max(free - leave, 0))
    return filler


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.rglob("*") if p.name.startswith(".tmp-"))


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_temporary(small_disk, tmp_path):
    # Room for what a run writes before its first checkpoint and for the least a checkpoint needs
    # (the early check passes), not for the whole checkpoint: the write itself fails.
    filler = fill(small_disk, 70 * 1024)
    run = small_disk / "run"
    result = kd_in_process(*RUN, "--out", str(run))
    assert_one_line_error(result, "No space left on device", "checkpoint step-", str(run / "checkpoints"),
                          "no checkpoint is complete", "--overwrite", ignore=PROGRESS)
    assert leftovers(run) == [] and not any((run / "checkpoints").iterdir())
    filler.unlink()
    again = kd_in_process(*RUN, "--out", str(run), "--overwrite")  # no complete checkpoint: it starts over
    assert again.returncode == 0, again.stderr
    plain = tmp_path / "plain"
    assert kd_in_process(*RUN, "--out", str(plain)).returncode == 0
    again_weights, straight = tensors(run / "model.safetensors"), tensors(plain / "model.safetensors")
    assert again_weights.keys() == straight.keys() and all(again_weights[name].equal(straight[name]) for name in straight)


def test_a_checkpoint_that_will_not_fit_is_refused_before_writing_and_resume_ends_bitwise(small_disk, tmp_path):
    # Room for one checkpoint: the second is refused before a byte is written, by the first one's size.
    filler = fill(small_disk, 150 * 1024)
    run = small_disk / "run"
    result = kd_in_process(*RUN, "--out", str(run))
    line = assert_one_line_error(result, "cannot write checkpoint step-", "KiB free", "add --resume", ignore=PROGRESS)
    assert "step-00000022 is complete" in line, line
    assert leftovers(run) == [] and [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000022"]
    filler.unlink()
    assert kd_in_process(*RUN, "--out", str(run), "--resume").returncode == 0
    plain = tmp_path / "plain"
    assert kd_in_process(*RUN, "--out", str(plain)).returncode == 0
    resumed, straight = tensors(run / "model.safetensors"), tensors(plain / "model.safetensors")
    assert all(resumed[name].equal(straight[name]) for name in straight)


def test_no_room_for_even_one_checkpoint_is_said_before_training(small_disk):
    fill(small_disk, 32 * 1024)
    run = small_disk / "run"
    result = kd_in_process(*RUN, "--out", str(run))
    assert_one_line_error(result, "no room for checkpoints", "KiB free")
    assert not list((run / "checkpoints").glob("*")) if (run / "checkpoints").exists() else True


def test_weights_that_cannot_be_written_are_one_line_and_leave_no_temporary(small_disk):
    fill(small_disk, 16 * 1024)  # config.json and summary.csv fit, the 27 KiB of weights do not
    run = small_disk / "run"
    result = kd_in_process(*RUN[:-2], "--out", str(run))  # no checkpoints
    assert_one_line_error(result, "No space left on device", "writing model.safetensors", ignore=PROGRESS)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "summary.csv"]


ONE_EPOCH = ["train-teacher", "--dataset", "digits", "--model", "tiny_cnn", "--epochs", "1"]


@pytest.mark.parametrize("leave_kib,file,written", [
    (40, "cmatrix.safetensors", ["config.json", "model.safetensors", "summary.csv"]),  # room for the weights, not the C-matrix
    (44, "metrics.json", ["cmatrix.safetensors", "config.json", "model.safetensors", "summary.csv"]),
])
def test_a_c_matrix_or_metrics_that_cannot_be_written_is_one_line(small_disk, leave_kib, file, written):
    fill(small_disk, leave_kib * 1024)
    run = small_disk / "run"
    result = kd_in_process(*ONE_EPOCH, "--out", str(run))
    assert_one_line_error(result, "No space left on device", f"writing {file}", ignore=PROGRESS)
    assert sorted(p.name for p in run.iterdir()) == written  # no temporary, nothing half-written


def test_overwrite_staging_on_a_full_disk_leaves_the_old_run_intact(small_disk, tmp_path):
    run = small_disk / "run"
    assert kd_in_process(*ONE_EPOCH, "--out", str(run)).returncode == 0
    old = {p.name: p.read_bytes() for p in run.iterdir()}
    filler = fill(small_disk, 36 * 1024)  # the staged config.json and summary.csv fit, its weights do not
    result = kd_in_process(*ONE_EPOCH, "--seed", "1", "--out", str(run), "--overwrite")
    assert_one_line_error(result, "No space left on device", "writing model.safetensors", ".kd-staging", ignore=PROGRESS)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == old  # the old run, byte for byte
    assert leftovers(run) == []
    filler.unlink()
    assert kd_in_process(*ONE_EPOCH, "--seed", "1", "--out", str(run), "--overwrite").returncode == 0
    plain = tmp_path / "plain"
    assert kd_in_process(*ONE_EPOCH, "--seed", "1", "--out", str(plain)).returncode == 0
    replaced, straight = tensors(run / "model.safetensors"), tensors(plain / "model.safetensors")
    assert all(replaced[name].equal(straight[name]) for name in straight)
    assert not (run / ".kd-staging").exists()
