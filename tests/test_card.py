"""`kd cmatrix card`: the markdown card published next to a shared C-matrix file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from kd.cmatrix.artifact import CMatrix, save_cmatrix
from kd.io import current_umask
from tests.helpers import SHORT_ERROR, assert_one_line_error, kd_in_process, sha256

NAMES = ("ant", "bee", "cat", "dog", "eel")


def probs_with_pairs() -> torch.Tensor:
    """5 classes: ant and bee are each other's top neighbour, and so are cat and dog; eel's is cat."""
    probs = torch.full((5, 5), 0.1)
    for a, b, value in ((0, 1, 0.6), (1, 0, 0.5), (2, 3, 0.55), (3, 2, 0.45), (4, 2, 0.4)):
        probs[a, b] = value
    probs.fill_diagonal_(0.0)
    return probs / probs.sum(dim=1, keepdim=True)


def write(path, names=NAMES, probs=None, **kw) -> str:
    cm = CMatrix.from_probs(probs if probs is not None else probs_with_pairs(), class_names=names, alpha=kw.pop("alpha", 0.15),
                            source=kw.pop("source", "lspp"), dataset="zoo", teacher_model="small_cnn", **kw)
    save_cmatrix(path, cm)
    return str(path)


def test_card_on_stdout_holds_classes_alpha_source_neighbours_pairs_and_checksum(tmp_path):
    file = write(tmp_path / "zoo.safetensors", teacher_top1=0.875)
    result = kd_in_process("cmatrix", "card", file)
    assert result.returncode == 0, result.stderr
    card = result.stdout
    assert card.startswith("# C-matrix card: zoo.safetensors")
    assert "**Classes (5):** ant, bee, cat, dog, eel" in card
    assert "| alpha | 0.15 |" in card and "| source | lspp |" in card and "| dataset | zoo |" in card
    assert "| teacher | small\\_cnn (top-1 0.8750) |" in card
    assert f"| sha256 | `{sha256(file)}` |" in card
    assert "| eel | cat (0.571), ant (0.143), bee (0.143) |" in card  # top 3, ties in class order
    assert "**Mutual top neighbours:** ant \u2194 bee, cat \u2194 dog" in card
    assert "Heatmap" not in card


def test_card_file_and_heatmap_png(tmp_path):
    file = write(tmp_path / "zoo.safetensors")
    (tmp_path / "share").mkdir()
    card_path, image = tmp_path / "share" / "CARD.md", tmp_path / "share" / "figures" / "zoo.png"
    image.parent.mkdir()
    result = kd_in_process("cmatrix", "card", file, "--out", str(card_path), "--image", str(image), "--top", "1")
    assert result.returncode == 0, result.stderr
    card = card_path.read_text()
    assert "![C-matrix heatmap of zoo.safetensors](figures/zoo.png)" in card  # relative to the card
    assert "| dog | cat (" in card and "Nearest classes (top 1)" in card
    pixels = np.asarray(Image.open(image).convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
    for written in (card_path, image):
        assert os.stat(written).st_mode & 0o777 == 0o666 & ~current_umask()
    assert_one_line_error(kd_in_process("cmatrix", "card", file, "--out", str(card_path)), "--overwrite", **SHORT_ERROR)
    assert kd_in_process("cmatrix", "card", file, "--out", str(card_path), "--overwrite").returncode == 0
    assert "Heatmap" not in card_path.read_text()


def test_card_shows_the_provenance_chain_of_a_merge(tmp_path):
    a = write(tmp_path / "a.safetensors")
    other = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)).fill_diagonal_(0.0)
    b = write(tmp_path / "b.safetensors", probs=other / other.sum(dim=1, keepdim=True), alpha=0.05)
    subset = tmp_path / "sub.safetensors"
    assert kd_in_process("cmatrix", "subset", a, "--classes", "ant,bee,cat", "--out", str(subset)).returncode == 0
    merged = tmp_path / "merged.safetensors"
    b_subset = tmp_path / "bsub.safetensors"
    assert kd_in_process("cmatrix", "subset", b, "--classes", "ant,bee,cat", "--out", str(b_subset)).returncode == 0
    assert kd_in_process("cmatrix", "merge", str(subset), str(b_subset), "--out", str(merged)).returncode == 0
    card = kd_in_process("cmatrix", "card", str(merged)).stdout
    assert "| source | merge |" in card and "| alpha | 0.1 |" in card
    assert "- this file: source merge" in card
    assert f"  - from sub.safetensors (sha256 `{sha256(subset)[:12]}\u2026`): source subset" in card
    assert f"    - from a.safetensors (sha256 `{sha256(a)[:12]}\u2026`): source lspp" in card  # nested: the subset's input
    assert f"    - from b.safetensors (sha256 `{sha256(b)[:12]}\u2026`): source lspp" in card
    assert "teacher small\\_cnn (accuracy not recorded)" in card


def test_many_classes_are_abbreviated_and_odd_names_cannot_break_the_markdown(tmp_path):
    names = tuple(f"class-{i:02d}" for i in range(39)) + ("a|b `x` *y*",)
    probs = torch.rand(40, 40, generator=torch.Generator().manual_seed(0))
    probs.fill_diagonal_(0.0)
    file = write(tmp_path / "many.safetensors", names=names, probs=probs / probs.sum(dim=1, keepdim=True))
    card = kd_in_process("cmatrix", "card", file).stdout
    assert "**Classes (40):** class-00, class-01," in card and "(15 more)" in card and "class-25" not in card.split("\n## ")[0]
    odd = "a\\|b \\`x\\` \\*y\\*"
    assert f"| {odd} |" in card  # the pipe is escaped: the row keeps its two cells
    rows = [line for line in card.splitlines() if line.startswith("| class-") or line.startswith(f"| {odd}")]
    assert len(rows) == 40


@pytest.mark.parametrize("args,fragment", [
    (["--image", "heat.jpg"], "ending in .png"),
    (["--out", "same.png", "--image", "same.png"], "same file"),
    (["--out", "missing-dir/CARD.md"], "does not exist"),
])
def test_card_bad_input_is_one_line(tmp_path, args, fragment):
    file = write(tmp_path / "zoo.safetensors")
    args = [str(tmp_path / a) if a.endswith((".jpg", ".png", ".md")) else a for a in args]
    assert_one_line_error(kd_in_process("cmatrix", "card", file, *args), fragment, **SHORT_ERROR)
    assert_one_line_error(kd_in_process("cmatrix", "card", str(tmp_path / "absent.safetensors")), "file not found", **SHORT_ERROR)
