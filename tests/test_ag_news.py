"""examples/ag_news.py, the worked example on real text (AG News under the Hugging Face Trainer).

Its short mode runs as a user runs the example (a subprocess, from the repository root): every
run of the table, the C-matrix with AG News' class names, `kd cmatrix show` and `kd cmatrix plot`.
The docs show the committed results.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from kd import load_cmatrix  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

AG_NEWS = ROOT.parent / "shared" / "data" / "ag_news"
CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
STEMS = ["tfidf", "teacher-onehot", "teacher-lspp", "student-proxy", "student-kd", "student-plain"]

needs_data = pytest.mark.skipif(not (AG_NEWS / "test.csv").exists(), reason=f"AG News not found at {AG_NEWS}")


def example():
    spec = importlib.util.spec_from_file_location("ag_news_example", ROOT / "examples" / "ag_news.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_short(out) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "examples/ag_news.py", "--short", "--seeds", "0", "--out", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@needs_data
@pytest.mark.slow
def test_the_short_mode_fills_every_row_exports_the_cmatrix_and_skips_finished_runs(tmp_path):
    result = run_short(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((tmp_path / "ag_news.json").read_text())
    assert list(report["rows"]) == STEMS
    for stem, runs in report["rows"].items():
        assert len(runs) == 1, stem
        assert 0 <= runs[0]["test_top1"] <= 1 and all(math.isfinite(value) for value in runs[0].values() if value is not None)
    assert report["task"]["train_items"] == 160 and report["task"]["per_class_held_out"] == [10, 10, 10, 10]
    table = (tmp_path / "ag_news.md").read_text()
    assert all(f"| {title} | " in table for title in report["titles"].values())

    cmatrix = load_cmatrix(tmp_path / "teacher-lspp-s0" / "cmatrix.safetensors", expected_class_names=CLASSES)
    assert cmatrix.source == "lspp" and cmatrix.dataset == "ag_news" and cmatrix.teacher_model == "bert-1x32-scratch"
    assert cmatrix.teacher_top1 == pytest.approx(report["rows"]["teacher-lspp"][0]["test_top1"])
    assert all(f"{name} " in report["cmatrix_show"] for name in CLASSES) and "`kd cmatrix show`" in table
    assert (tmp_path / "ag_news_cmatrix.png").read_bytes().startswith(b"\x89PNG")
    assert load_cmatrix(tmp_path / "teacher-lspp-s0" / "final" / "cmatrix.safetensors").class_names == tuple(CLASSES)

    finished = {path: path.stat().st_mtime_ns for path in tmp_path.glob("*/metrics.json")}
    assert len(finished) == len(STEMS)
    again = run_short(tmp_path)  # a second sitting: every run is finished, nothing trains
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout
    assert {path: path.stat().st_mtime_ns for path in tmp_path.glob("*/metrics.json")} == finished


@needs_data
def test_the_split_is_stratified_and_the_same_for_every_seed():
    ag_news = example()
    texts, labels, class_names = ag_news.read_ag_news(AG_NEWS)
    assert class_names == CLASSES and len(texts) == 7600 and not any("\\" in text or "#36;" in text for text in texts)
    train, held_out = ag_news.split(labels, None)
    assert len(train) == 6080 and len(held_out) == 1520 and not set(train) & set(held_out)
    assert [sum(labels[i] == k for i in held_out) for k in range(4)] == [380] * 4
    again = ag_news.split(labels, None)
    assert (again[0] == train).all() and (again[1] == held_out).all()


def test_the_docs_show_the_committed_table():
    committed = (ROOT / "benchmarks" / "results" / "ag_news.md").read_text()
    rows = [line for line in committed.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(STEMS)
    docs = (ROOT / "docs" / "text.md").read_text()
    missing = [row for row in rows if row not in docs.splitlines()]
    assert not missing, f"docs/text.md does not show benchmarks/results/ag_news.md's rows (copy them): {missing}"
    assert "python examples/ag_news.py" in docs and "images/ag_news_cmatrix.png" in docs
