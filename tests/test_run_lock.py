"""A run directory belongs to one run at a time: the main process holds an flock on OUT/.kd-lock."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import (
    ENV, FAST, KD, SHORT_ERROR, assert_one_line_error, kd_in_process, kill_tree, read_run, sha256,
    start_and_kill_after_first_checkpoint,
)

from kd.training.rundir import STAGING_DIR, latest_checkpoint, lock_path

LONG = ["train-teacher", "--model", "tiny_cnn", "--epochs", "100", "--max-steps", "60", "--batch-size", "16"]


def start_long_run(out: Path) -> subprocess.Popen:
    """`kd train-teacher` on `out`, returned once it is training (its config.json is written), then
    paused with SIGSTOP: a live run holding `out` for as long as the test needs (SIGCONT resumes it)."""
    process = subprocess.Popen([KD, *LONG, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGSTOP)
    assert lock_path(out).read_text().strip() == str(process.pid)
    return process


def test_a_second_concurrent_run_is_refused_and_the_first_finishes(tmp_path):
    out = tmp_path / "t"
    first = start_long_run(out)
    try:
        second = subprocess.run([KD, *LONG, "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
        assert_one_line_error(second, f"--out {out} is in use by another kd run (pid {first.pid})", **SHORT_ERROR)
        os.kill(first.pid, signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            kill_tree(first)
    config, metrics = read_run(out)
    assert config["max_steps"] == 60 and metrics["steps"] == 60
    assert (out / "model.safetensors").is_file()
    assert not lock_path(out).exists() and not (out / STAGING_DIR).exists()  # released with the run
    assert kd_in_process("compare", str(out)).returncode == 0


def test_overwrite_and_resume_are_refused_while_a_run_holds_the_directory(tmp_path):
    out = tmp_path / "t"
    first = start_long_run(out)
    try:
        config = sha256(out / "config.json")
        for flag in ("--overwrite", "--resume"):
            assert_one_line_error(kd_in_process(*LONG, "--out", str(out), flag), f"in use by another kd run (pid {first.pid})",
                                  **SHORT_ERROR)
            assert not (out / STAGING_DIR).exists() and sha256(out / "config.json") == config
            assert lock_path(out).read_text().strip() == str(first.pid)  # the holder's lock file is untouched
        # a run elsewhere in the same process is not held up
        assert kd_in_process("train-teacher", "--out", str(tmp_path / "other"), *FAST).returncode == 0
    finally:
        kill_tree(first)


def test_a_killed_run_leaves_a_directory_resume_and_overwrite_take_at_once(tmp_path):
    out = tmp_path / "t"
    args = ["train-teacher", "--model", "tiny_cnn", "--checkpoint-every", "1", "--max-steps", "8", "--batch-size", "16",
            "--out", str(out)]
    assert start_and_kill_after_first_checkpoint(args, out)
    assert lock_path(out).exists() and latest_checkpoint(out) is not None  # left unlocked by the kernel
    result = kd_in_process(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert read_run(out)[1]["resumed_from_step"] >= 1 and not lock_path(out).exists()
    assert start_and_kill_after_first_checkpoint([*args, "--overwrite"], out)
    result = kd_in_process(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert read_run(out)[1]["resumed_from_step"] is None and not (out / STAGING_DIR).exists()


def test_the_lock_file_is_not_run_content(tmp_path):
    out = tmp_path / "t"
    args = ["train-teacher", "--checkpoint-every", "1", "--out", str(out), *FAST]
    assert kd_in_process(*args).returncode == 0
    lock_path(out).write_text("999999\n")  # as a killed run leaves it
    assert "finished" in kd_in_process("compare", str(out)).stdout
    assert_one_line_error(kd_in_process(*args), "already exists and is not empty", **SHORT_ERROR)
    assert kd_in_process(*args, "--resume").returncode == 0
    result = kd_in_process(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert read_run(out)[1]["resumed_from_step"] is None
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "cmatrix.safetensors", "config.json", "metrics.json",
                                               "summary.csv", "checkpoints"}
    assert not lock_path(out).exists()  # the stale lock file was taken over, then removed


def test_a_run_that_fails_its_checks_leaves_no_directory(tmp_path):
    out = tmp_path / "new" / "t"
    assert_one_line_error(kd_in_process("train-teacher", "--model", "vit_tiny_patch16_224", "--out", str(out), *FAST),
                          "--image-size", **SHORT_ERROR)
    assert not out.exists()
    assert_one_line_error(kd_in_process("distill", "--method", "kd", "--teacher", str(tmp_path / "none"), "--out", str(out), *FAST))
    assert not out.exists() and not (tmp_path / "new").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    assert_one_line_error(kd_in_process("train-teacher", "--model", "vit_tiny_patch16_224", "--out", str(existing), *FAST))
    assert existing.is_dir() and not any(existing.iterdir())  # the user's own empty directory stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # and no lock file is left beside it
