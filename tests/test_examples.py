"""The examples run as a user runs them: a subprocess, from the repository root."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from kd import load_cmatrix
from tests.helpers import ROOT


def accuracy(output: str, network: str) -> float:
    match = re.search(rf"^{network} test accuracy: ([0-9.]+)$", output, flags=re.MULTILINE)
    assert match, output
    return float(match.group(1))


@pytest.mark.slow
def test_tabular_lspp_trains_a_teacher_exports_its_cmatrix_and_a_student_learns_from_it(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tabular_lspp.py"), "--out", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr

    cmatrix = load_cmatrix(tmp_path / "cmatrix.safetensors", expected_class_names=[str(digit) for digit in range(10)])
    assert cmatrix.num_classes == 10 and cmatrix.source == "lspp" and cmatrix.alpha == pytest.approx(0.1)
    torch.testing.assert_close(cmatrix.probs.sum(dim=1), torch.ones(10))
    assert torch.all(cmatrix.probs.diagonal() == 0)
    off_diagonal = cmatrix.probs[~torch.eye(10, dtype=torch.bool)]
    assert (off_diagonal - 1 / 9).abs().max() > 1e-3  # learned: the rows are no longer uniform

    teacher, student = accuracy(result.stdout, "teacher"), accuracy(result.stdout, "student")
    assert cmatrix.teacher_top1 == pytest.approx(teacher, abs=1e-4)
    assert student > 0.6 and teacher > 0.6  # chance is 0.1


def markdown_section(text: str, heading: str | None) -> str:
    """The part of a markdown text under `heading` (a whole heading line, e.g. "### Usage"), up to
    the next heading of the same or a higher level outside code blocks; the whole text for None."""
    if heading is None:
        return text
    level, lines, fenced, inside = heading.split(" ", 1)[0], [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < hashes <= len(level) and line[hashes:hashes + 1] == " ":
            if inside:
                break
            inside = line == heading
            continue
        if inside:
            lines.append(line)
    assert inside, f"no {heading!r} heading"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("document, heading", [
    ("docs/library.md", None),  # the page is "Use LS++ in your own training loop"
    ("README.md", "### LS++ in your own training loop"),  # the README's quick start
])
def test_the_readme_training_loop_code_runs_as_printed(tmp_path, document, heading):
    """The "Use LS++ in your own training loop" code blocks (docs/library.md, and the README's
    quick start), run in order as one script."""
    section = markdown_section((ROOT / document).read_text(), heading)
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL))
    assert "LSPPLoss" in code and "ProxyTeacherLoss" in code
    (tmp_path / "snippet.py").write_text(code)
    result = subprocess.run(
        [sys.executable, "snippet.py"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    cmatrix = load_cmatrix(tmp_path / "cmatrix.safetensors")
    assert cmatrix.num_classes == 10 and cmatrix.source == "lspp"
