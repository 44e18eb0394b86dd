"""What a new user hits with bad input, interrupts and divergence: one line on stderr (under 300
characters, no traceback), a non-zero exit, and nothing already written lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd.training.rundir import list_checkpoints
from tests.helpers import (
    ENV, FAST, KD, SHORT_ERROR, assert_bitwise_equal, assert_one_line_error, kd_in_process, make_image_folder, read_run,
    start_and_kill_after_first_checkpoint, tensors,
)

DIVERGE = ["--lr", "1e6", "--epochs", "1", "--max-steps", "20", "--batch-size", "16"]


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(digits_teacher) -> Path:
    return digits_teacher  # shared: the tests change only copies of it


def copy_of(run: Path, where: Path) -> Path:
    target = where / run.name
    shutil.copytree(run, target)
    return target


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("args", [
    ["train-teacher"], ["train-teacher", "--method", "onehot"], ["distill", "--proxy", "PROXY"],
], ids=["lspp", "onehot", "proxy"])
def test_divergence_stops_the_run_and_writes_no_artifact(tmp_path, finished_run, args):
    args = [str(finished_run / "cmatrix.safetensors") if a == "PROXY" else a for a in args]
    out = tmp_path / "diverged"
    line = assert_one_line_error(kd_in_process(*args, "--out", str(out), *DIVERGE), "diverged", "--lr", **SHORT_ERROR)
    assert "step" in line
    assert not any((out / name).exists() for name in ("model.safetensors", "metrics.json", "cmatrix.safetensors"))
    strict_json(out / "config.json")
    assert strict_json(out / "status.json")["status"] == "diverged"
    table = kd_in_process("compare", str(finished_run), str(out))
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[1].rstrip().endswith("finished") and "diverged at step" in rows[2] and "nan" not in table.stdout


def test_divergence_keeps_only_finite_checkpoints(tmp_path):
    out = tmp_path / "diverged"
    result = kd_in_process("train-teacher", "--out", str(out), "--checkpoint-every-steps", "1", *DIVERGE)
    assert_one_line_error(result, "diverged", **SHORT_ERROR)
    for checkpoint in list_checkpoints(out):
        for name, tensor in load_file(str(checkpoint / "model.safetensors")).items():
            assert torch.isfinite(tensor).all(), (checkpoint.name, name)


# ----------------------------------------------------------------------------- --overwrite loses nothing


def test_failed_overwrite_leaves_the_old_run_intact(tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    cases = [
        (["train-teacher", "--model", "nosuchnet"], "nosuchnet"),
        (["train-teacher", *DIVERGE], "diverged"),
        (["distill", "--teacher", str(tmp_path / "nowhere")], "nowhere"),
        (["distill", "--proxy", str(tmp_path / "absent.safetensors")], "absent.safetensors"),
        (["train-teacher", "--model", "vit_tiny_patch16_224"], "--image-size"),  # patch larger than the 8 px image
    ]
    for args, fragment in cases:
        assert_one_line_error(kd_in_process(*args, "--out", str(run), "--overwrite", *FAST[:2]), fragment, **SHORT_ERROR)
        assert snapshot(run) == before, args


def test_overwrite_with_a_student_of_the_run_itself_replaces_it_at_the_end(tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    result = kd_in_process("distill", "--teacher", str(run), "--model", "tiny_cnn", "--out", str(run), "--overwrite", *FAST)
    assert result.returncode == 0, result.stderr
    config, metrics = read_run(run)
    assert config["stage"] == metrics["stage"] == "student" and config["method"] == "kd"
    assert not (run / "cmatrix.safetensors").exists()  # the old run's, not this one's
    assert (run / "notes.txt").read_text() == "mine" and not list(run.glob(".*"))
    run2 = copy_of(finished_run, tmp_path / "second")
    result = kd_in_process("distill", "--proxy", str(run2 / "cmatrix.safetensors"), "--model", "tiny_cnn",
                           "--out", str(run2), "--overwrite", *FAST)
    assert result.returncode == 0, result.stderr
    assert read_run(run2)[0]["method"] == "proxy"


def test_killed_overwrite_run_leaves_the_old_run_and_resumes(tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    args = ["train-teacher", "--epochs", "5", "--batch-size", "32", "--checkpoint-every-steps", "10", "--out", str(run)]
    staging = run / ".kd-staging"
    assert start_and_kill_after_first_checkpoint([*args, "--overwrite"], staging)
    assert {k: v for k, v in snapshot(run).items() if not k.startswith(".kd-staging")} == before
    result = subprocess.run([KD, *args, "--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_run(run)[1]["resumed_from_step"] >= 10 and not staging.exists()


def test_overwrite_in_a_read_only_folder_is_one_line(tmp_path, finished_run):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root ignores folder permissions and setpriv is missing")
    shared = Path("/tmp") / f"kd-readonly-{os.getpid()}"
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir()
    try:
        run = copy_of(finished_run, shared)
        before = snapshot(run)
        for path in (run, shared):
            path.chmod(0o555)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        for args in (["train-teacher", "--out", str(run), "--overwrite"], ["train-teacher", "--out", str(shared / "new")]):
            result = subprocess.run([*drop, KD, *args, *FAST], capture_output=True, text=True, timeout=300)
            assert_one_line_error(result, "cannot write", **SHORT_ERROR)
        assert snapshot(run) == before
    finally:
        for path in (shared, *shared.rglob("*")):
            path.chmod(0o755)
        shutil.rmtree(shared)


# ----------------------------------------------------------------------------- signals


def stop_with(signum: int, args: list[str], out: Path) -> subprocess.CompletedProcess:
    """Start `kd ARGS --out OUT`, send `signum` about a second into training, and wait for it to end."""
    process = subprocess.Popen([KD, *args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists() and time.monotonic() < deadline:  # written just before training starts
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, signum):
    args = ["train-teacher", "--epochs", "5", "--batch-size", "32"]
    out = tmp_path / "stopped"
    result = stop_with(signum, args, out)
    assert result.returncode == 128 + signum, result.stderr[-2000:]
    assert_one_line_error(result, signal.Signals(signum).name, "--resume", **SHORT_ERROR)
    assert len(list_checkpoints(out)) == 1 and not (out / "model.safetensors").exists()
    if signum != signal.SIGTERM:
        return
    # Preemption and resume end where an uninterrupted run ends, bitwise.
    checkpoint = list_checkpoints(out)[0]
    resumed = subprocess.run([KD, *args, "--out", str(out), "--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = tmp_path / "reference"
    assert subprocess.run([KD, *args, "--out", str(reference)], capture_output=True, env=ENV, timeout=300).returncode == 0
    assert_bitwise_equal(tensors(out / "model.safetensors"), tensors(reference / "model.safetensors"))
    assert_bitwise_equal(tensors(out / "cmatrix.safetensors"), tensors(reference / "cmatrix.safetensors"))
    assert read_run(out)[1]["resumed_from_step"] == int(checkpoint.name.split("-")[1])


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    process = subprocess.Popen([KD, "train-teacher", "--out", str(tmp_path / "r")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # still importing torch
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() in ("kd: interrupted", "kd: aborted"), stderr
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- other one-line errors


def test_unwritable_report_paths_are_one_line(tmp_path, finished_run):
    assert_one_line_error(kd_in_process("compare", str(finished_run), "--markdown", str(tmp_path / "missing" / "t.md")), "missing", **SHORT_ERROR)
    assert_one_line_error(kd_in_process("compare", str(finished_run), "--csv", str(tmp_path / "missing" / "t.csv")), "missing", **SHORT_ERROR)


def test_corrupt_image_in_a_streamed_imagefolder_is_one_line_before_training(tmp_path):
    data = make_image_folder(tmp_path / "data", size=72)  # larger than 64 px: streamed
    (data / "train" / "bee" / "3.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "run"
    args = ["train-teacher", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "tiny_cnn", "--max-steps", "2",
            "--batch-size", "4", "--out", str(out)]
    assert_one_line_error(kd_in_process(*args), "3.png", **SHORT_ERROR)
    assert not out.exists()


def test_resume_notices_other_data_behind_the_same_folder_name(tmp_path):
    first = make_image_folder(tmp_path / "a" / "data")
    second = make_image_folder(tmp_path / "b" / "data", per_class=7)
    out = tmp_path / "run"
    args = ["train-teacher", "--dataset", "imagefolder", "--checkpoint-every", "1", "--out", str(out), *FAST]
    assert kd_in_process(*args, "--data-dir", str(first)).returncode == 0
    assert_one_line_error(kd_in_process(*args, "--data-dir", str(second), "--resume"), "--resume: --data-dir", **SHORT_ERROR)
    config, _ = read_run(out)
    assert config["data_dir"] == str(first.resolve())


def test_files_honour_the_umask(tmp_path):
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        result = kd_in_process("train-teacher", "--out", str(out), *FAST)
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    for name in ("model.safetensors", "cmatrix.safetensors", "config.json", "metrics.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_cmatrix_validate_warns_about_peaked_rows(tmp_path):
    from kd.cmatrix.artifact import CMatrix, save_cmatrix

    probs = torch.full((4, 4), 1 / 3).fill_diagonal_(0)
    probs[2] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    path = tmp_path / "peaked.safetensors"
    save_cmatrix(path, CMatrix.from_probs(probs, class_names=list("abcd"), alpha=0.1))
    result = kd_in_process("cmatrix", "validate", str(path))
    assert result.returncode == 0 and "OK" in result.stdout
    assert "warning" in result.stderr and "'c'" in result.stderr


def test_model_that_cannot_take_the_image_size_fails_before_out_is_made(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(kd_in_process("train-teacher", "--model", "vit_tiny_patch16_224", "--out", str(out), *FAST), "--image-size", **SHORT_ERROR)
    assert not out.exists()


def test_cmatrix_from_teacher_works_from_another_working_directory(tmp_path):
    make_image_folder(tmp_path / "project" / "data")
    run = subprocess.run([KD, "train-teacher", "--dataset", "imagefolder", "--data-dir", "data", "--out", "teacher", *FAST],
                         cwd=tmp_path / "project", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([KD, "cmatrix", "from-teacher", str(tmp_path / "project" / "teacher"), "--out", "c.safetensors"],
                            cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "c.safetensors").exists()


def test_data_fingerprint_hashes_every_image_path_and_size_outside_hidden_folders(tmp_path):
    """The fingerprint against the definition written out here with os.walk."""
    import hashlib

    from kd.data.datasets import load_dataset
    from kd.data.imagefolder import is_image_file
    from kd.data.fingerprint import data_fingerprint

    root = make_image_folder(tmp_path / "data")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "x.png").write_bytes(b"not counted")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    expected, count = hashlib.sha256(), 0
    for split in ("train", "test"):
        found = []
        for folder, dirs, files in os.walk(root / split):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [(os.path.relpath(os.path.join(folder, f), root / split).replace(os.sep, "/"),
                       os.path.getsize(os.path.join(folder, f))) for f in files if is_image_file(f)]
        for relative, size in sorted(found):
            expected.update(f"{split}/{relative}\t{size}\n".encode())
            count += 1
    data = load_dataset("imagefolder", root)
    assert data_fingerprint(data, "imagefolder", root) == f"{count} files, sha256:{expected.hexdigest()[:16]}"
    assert count == 36
