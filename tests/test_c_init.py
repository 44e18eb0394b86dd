"""`kd train-teacher --method lspp --c-init FILE`: the learned C starts from a given C-matrix."""

import json
from pathlib import Path

import torch

from kd.cmatrix.artifact import CMatrix, file_sha256, load_cmatrix, save_cmatrix
from kd.methods import ExportInfo, build_method
from tests.helpers import DIGITS, assert_one_line_error, kd_in_process

RUN = ["train-teacher", "--method", "lspp", "--dataset", "digits", "--model", "tiny_cnn", "--epochs", "1", "--batch-size", "16",
       "--augment", "none", "--no-channels-last"]
STEP0 = ["--max-steps", "1", "--lr", "1e-30", "--weight-decay", "0"]  # C (and the network) stay where they start


def peaked_cmatrix(names, seed: int = 0, zeros: bool = False) -> CMatrix:
    """A far-from-uniform C-matrix over `names`; with `zeros`, some exactly-zero off-diagonal entries."""
    k = len(names)
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(k, k, generator=generator) ** 4
    if zeros:
        probs[:, : k // 2] = 0.0
        probs[torch.arange(k), (torch.arange(k) + 1) % k] += 0.5  # every row keeps mass off the diagonal
    probs.fill_diagonal_(0.0)
    return CMatrix.from_probs(probs / probs.sum(dim=1, keepdim=True), class_names=names, alpha=0.3, source="posthoc")


def write(path: Path, cm: CMatrix) -> Path:
    save_cmatrix(path, cm)
    return path


def exported(method) -> torch.Tensor:
    return method.to_cmatrix(ExportInfo(class_names=tuple(DIGITS), dataset="digits", model="m", test_top1=None)).probs


def test_the_method_starts_from_the_files_matrix_zeros_included(tmp_path):
    for zeros in (False, True):
        cm = peaked_cmatrix(DIGITS, zeros=zeros)
        path = write(tmp_path / f"c{zeros}.safetensors", cm)
        method = build_method("lspp", 10, DIGITS, c_init=str(path), alpha=0.1)  # another alpha than the file's 0.3
        assert torch.allclose(exported(method), cm.probs, atol=1e-5, rtol=0)
        assert (exported(method).diagonal() == 0).all()
        assert method.card()["c_init"] == str(path.resolve())
        assert method.card()["c_init_sha256"] == file_sha256(path)
    assert torch.allclose(exported(build_method("lspp", 10, DIGITS)), torch.full((10, 10), 1 / 9).fill_diagonal_(0))


def test_a_file_with_the_same_classes_in_another_order_is_remapped_by_name(tmp_path):
    order = [DIGITS[i] for i in (3, 0, 9, 1, 7, 2, 8, 5, 4, 6)]
    cm = peaked_cmatrix(order, seed=1)
    method = build_method("lspp", 10, DIGITS, c_init=str(write(tmp_path / "c.safetensors", cm)))
    index = [order.index(name) for name in DIGITS]
    assert torch.allclose(exported(method), cm.probs[index][:, index], atol=1e-5, rtol=0)
    assert not torch.allclose(exported(method), cm.probs, atol=1e-2)


def test_train_teacher_exports_the_given_matrix_at_step_0_and_records_the_file(tmp_path, monkeypatch):
    order = list(reversed(DIGITS))  # in the data's order only after remapping by name
    cm = peaked_cmatrix(order, seed=2, zeros=True)
    write(tmp_path / "start.safetensors", cm)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    result = kd_in_process(*RUN, *STEP0, "--c-init", "start.safetensors", "--out", str(out))
    assert result.returncode == 0, result.stderr
    learned = load_cmatrix(out / "cmatrix.safetensors", DIGITS)
    assert torch.allclose(learned.probs, cm.probs.flip(0).flip(1), atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["c_init"] == str(tmp_path / "start.safetensors")
    assert config["c_init_sha256"] == file_sha256(tmp_path / "start.safetensors")


def test_a_bad_file_is_one_line_and_nothing_is_written(tmp_path):
    other_names = write(tmp_path / "other.safetensors", peaked_cmatrix([f"c{i}" for i in range(10)]))
    fewer = write(tmp_path / "fewer.safetensors", peaked_cmatrix(DIGITS[:9]))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(other_names.read_bytes()[:200])
    cases = [
        (other_names, "class names differ from the dataset's"),
        (fewer, "the C-matrix has 9 classes but the dataset has 10"),
        (corrupt, "not a valid safetensors file"),
        (tmp_path / "missing.safetensors", "file not found"),
    ]
    for path, fragment in cases:
        out = tmp_path / f"out-{path.stem}"
        assert_one_line_error(kd_in_process(*RUN, *STEP0, "--c-init", str(path), "--out", str(out)), str(path), fragment)
        assert not out.exists()


def test_resume_refuses_another_file(tmp_path):
    first = write(tmp_path / "c.safetensors", peaked_cmatrix(DIGITS, seed=3))
    out = tmp_path / "run"
    args = [*RUN, "--max-steps", "2", "--checkpoint-every-steps", "1", "--c-init", str(first), "--out", str(out)]
    assert kd_in_process(*args).returncode == 0
    result = kd_in_process(*args, "--resume")
    assert result.returncode == 0, result.stderr  # the same file is accepted
    write(first, peaked_cmatrix(DIGITS, seed=4))  # another matrix under the same path
    assert_one_line_error(kd_in_process(*args, "--resume"), "--resume: --c-init")
    assert json.loads((out / "config.json").read_text())["c_init_sha256"] != file_sha256(first)
