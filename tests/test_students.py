"""Student stage: proxy targets, the KD loss, and `kd distill` / `kd compare` end to end on digits."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kd.cmatrix.artifact import CMatrix, load_cmatrix
from kd.losses import ProxyTeacherLoss
from kd.methods import build_method
from tests.helpers import CONTEXT, FAST, assert_one_line_error, kd, kd_in_process, make_image_folder, read_run


def random_cmatrix(k: int, seed: int) -> torch.Tensor:
    c = torch.rand(k, k, generator=torch.Generator().manual_seed(seed))
    c.fill_diagonal_(0)
    return c / c.sum(1, keepdim=True)


def proxy_loss(c: torch.Tensor, alpha: float) -> ProxyTeacherLoss:
    """The public proxy-teacher loss over the matrix `c` (a C-matrix file's contents)."""
    k = c.shape[0]
    return ProxyTeacherLoss(CMatrix.from_probs(c, class_names=[f"c{i}" for i in range(k)], alpha=alpha))


def test_proxy_targets_equal_onehot_mix_exactly():
    c = random_cmatrix(6, 0)
    labels = torch.tensor([0, 5, 2, 2, 1])
    targets = proxy_loss(c, alpha=0.2).targets(labels)
    for row, y in enumerate(labels.tolist()):
        expected = 0.2 * c[y].clone()
        expected[y] = 0.8  # C[y, y] == 0: the target class gets exactly 1 - a
        assert torch.equal(targets[row], expected)


def test_proxy_soft_labels_go_through_the_same_linear_map():
    c = random_cmatrix(4, 1)
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    torch.testing.assert_close(proxy_loss(c, 0.1).targets(soft), 0.9 * soft + 0.1 * soft @ c)


def test_proxy_loss_is_cross_entropy_with_those_targets():
    c = random_cmatrix(5, 2)
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 5, (7,), generator=torch.Generator().manual_seed(4))
    criterion = proxy_loss(c, 0.1)
    expected = torch.nn.functional.cross_entropy(logits, criterion.targets(labels))
    assert criterion(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    method = build_method("proxy", 5, criterion.class_names, cmatrix=criterion.cmatrix)
    assert method(logits, labels, CONTEXT)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("temperature,kd_weight,ce_weight", [(4.0, 0.9, 0.1), (1.0, 0.5, 0.5), (8.0, 1.0, 0.0)])
def test_hinton_loss_matches_independent_numpy(temperature, kd_weight, ce_weight):
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(6, 4, generator=generator) * 3
    teacher = torch.randn(6, 4, generator=generator) * 3
    labels = torch.randint(0, 4, (6,), generator=generator)

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    s, t = student.double().numpy(), teacher.double().numpy()
    p_student, p_teacher = softmax(s / temperature), softmax(t / temperature)
    kl = (p_teacher * (np.log(p_teacher) - np.log(p_student))).sum(1).mean()
    ce = -np.log(softmax(s)[np.arange(6), labels.numpy()]).mean()
    expected = ce_weight * ce + kd_weight * temperature**2 * kl
    # The `kd` method with a teacher network that passes its input through: the batch's
    # "images" are the teacher's logits.
    method = build_method("kd", 4, teacher=torch.nn.Identity(), temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight)
    parts = method(student, labels, dataclasses.replace(CONTEXT, images=teacher))
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5) and parts["kl"].item() == pytest.approx(kl, rel=1e-5)


def test_chain_proxy_kd_plain_and_compare(tmp_path, digits_teacher):
    # The proxy student needs the C-matrix file alone: move it away from its teacher's run.
    shared = tmp_path / "shared.safetensors"
    shutil.copy(digits_teacher / "cmatrix.safetensors", shared)
    runs = {}
    for name, args in {"proxy": ["--proxy", str(shared)], "kd": ["--teacher", str(digits_teacher)], "plain": []}.items():
        runs[name] = tmp_path / name
        result = kd("distill", "--model", "tiny_cnn", "--out", str(runs[name]), *FAST, *args)
        assert result.returncode == 0, result.stderr

    proxy_config, proxy_metrics = read_run(runs["proxy"])
    assert proxy_config["mode"] == "proxy" and proxy_config["teacher"] is None
    assert proxy_config["alpha"] == pytest.approx(load_cmatrix(shared).alpha)
    _, kd_metrics = read_run(runs["kd"])
    assert 0.0 < kd_metrics["teacher_forward_share"] < 1.0
    assert proxy_metrics.get("teacher_forward_share") is None
    for metrics in (proxy_metrics, kd_metrics):
        assert {"train_seconds", "images_per_second", "peak_memory_mb", "seconds_per_epoch"} <= metrics.keys()

    markdown, table_csv = tmp_path / "table.md", tmp_path / "table.csv"
    result = kd("compare", str(digits_teacher), *(str(p) for p in runs.values()), "--markdown", str(markdown), "--csv", str(table_csv))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["run", "stage", "method"] and len(lines) == 5
    assert "| proxy | student | proxy |" in markdown.read_text()
    rows = list(csv.DictReader(table_csv.open()))
    assert [row["method"] for row in rows] == ["lspp", "proxy", "kd", "onehot"]
    assert float(rows[2]["test_top1"]) == pytest.approx(kd_metrics["test_top1"])


def test_kd_leaves_teacher_weights_untouched(tmp_path, digits_teacher):
    before = (digits_teacher / "model.safetensors").read_bytes()
    assert kd("distill", "--teacher", str(digits_teacher), "--model", "tiny_cnn", "--out", str(tmp_path / "s"), *FAST).returncode == 0
    assert (digits_teacher / "model.safetensors").read_bytes() == before


def test_posthoc_cmatrix_from_teacher_serves_as_proxy(tmp_path, digits_teacher):
    posthoc = tmp_path / "posthoc.safetensors"
    result = kd("cmatrix", "from-teacher", str(digits_teacher), "--out", str(posthoc))
    assert result.returncode == 0, result.stderr
    cm = load_cmatrix(posthoc)
    assert cm.source == "posthoc" and cm.class_names == tuple(str(d) for d in range(10))
    assert torch.all(cm.probs.diagonal() == 0)
    assert kd("distill", "--proxy", str(posthoc), "--model", "tiny_cnn", "--out", str(tmp_path / "s"), *FAST).returncode == 0
    assert_one_line_error(kd_in_process("cmatrix", "from-teacher", str(digits_teacher), "--out", str(posthoc)), "--overwrite")


def _doctored(source, target, mutate_probs=None, metadata_update=None):
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = dict(f.metadata())
    if mutate_probs:
        mutate_probs(tensors["cmatrix"])
    metadata.update(metadata_update or {})
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_distill_rejects_bad_cmatrix_files_in_one_line(tmp_path, digits_teacher):
    good = digits_teacher / "cmatrix.safetensors"
    three_class_data = make_image_folder(tmp_path / "abc", classes=("ant", "bee", "cat"))
    three_class_teacher = tmp_path / "abc-teacher"
    assert kd("train-teacher", "--dataset", "imagefolder", "--data-dir", str(three_class_data),
              "--out", str(three_class_teacher), *FAST).returncode == 0
    renamed_names = json.dumps([f"digit-{d}" for d in range(10)])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    bad_files = {
        "wrong K": (three_class_teacher / "cmatrix.safetensors", "3"),
        "wrong names": (_doctored(good, tmp_path / "names.safetensors", metadata_update={"class_names": renamed_names}), "digit-0"),
        "NaN": (_doctored(good, tmp_path / "nan.safetensors", lambda c: c.__setitem__((0, 1), float("nan"))), "finite"),
        "negative": (_doctored(good, tmp_path / "neg.safetensors", lambda c: c.__setitem__((0, 1), -0.5)), "negative"),
        "diagonal": (_doctored(good, tmp_path / "diag.safetensors", lambda c: c.__setitem__((2, 2), 0.3)), "diagonal"),
        "truncated": (truncated, "truncated"),
    }
    for case, (path, fragment) in bad_files.items():
        result = kd_in_process("distill", "--proxy", str(path), "--model", "tiny_cnn", "--out", str(tmp_path / "s"), *FAST)
        assert_one_line_error(result, fragment)
        assert not (tmp_path / "s" / "model.safetensors").exists(), case


def test_remap_by_name_reorders_a_cmatrix_in_another_class_order(tmp_path):
    data = make_image_folder(tmp_path / "abc", classes=("ant", "bee", "cat"))
    reordered = make_image_folder(tmp_path / "cba", classes=("ant", "bee", "cat"))
    teacher = tmp_path / "teacher"
    assert kd("train-teacher", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(teacher), *FAST).returncode == 0
    flipped = tmp_path / "flipped.safetensors"
    cm = load_cmatrix(teacher / "cmatrix.safetensors")
    from kd.cmatrix.artifact import remap_by_name, save_cmatrix

    save_cmatrix(flipped, remap_by_name(cm, ["cat", "bee", "ant"]))
    args = ["distill", "--dataset", "imagefolder", "--data-dir", str(reordered), "--proxy", str(flipped), *FAST]
    assert_one_line_error(kd_in_process(*args, "--out", str(tmp_path / "s1")), "--remap-by-name")
    assert kd(*args, "--out", str(tmp_path / "s2"), "--remap-by-name").returncode == 0


def test_distill_flag_errors(tmp_path, digits_teacher):
    out = str(tmp_path / "s")
    cmatrix = str(digits_teacher / "cmatrix.safetensors")
    assert_one_line_error(kd_in_process("distill", "--proxy", cmatrix, "--teacher", str(digits_teacher), "--out", out, *FAST), "--proxy")
    assert_one_line_error(kd_in_process("distill", "--teacher", str(tmp_path / "nowhere"), "--out", out, *FAST), "nowhere")
    assert_one_line_error(kd_in_process("distill", "--teacher", str(digits_teacher), "--temperature", "0", "--out", out, *FAST), "--temperature")
    assert_one_line_error(kd_in_process("distill", "--proxy", cmatrix, "--alpha", "1.5", "--out", out, *FAST), "--alpha")
    assert_one_line_error(kd_in_process("compare", str(tmp_path / "nowhere")), "nowhere")
