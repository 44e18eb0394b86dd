"""The benchmark scripts run end to end (a few steps on digits), so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> None:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_student_modes_benchmark_writes_ratios(tmp_path):
    run_script("benchmarks/student_modes.py", "--dataset", "digits", "--student", "tiny_cnn", "--teacher-model", "small_cnn",
               "--steps", "3", "--repeats", "2", "--batch-size", "32", "--name", "smoke", "--results-dir", str(tmp_path))
    report = json.loads((tmp_path / "student_modes_smoke.json").read_text())
    assert len(report["ratio_proxy_over_plain"]["all"]) == 2
    assert report["ratio_kd_over_proxy"]["min"] > 0
    assert 0 < report["kd_teacher_forward_share"]["median"] < 1
    assert "proxy / plain" in (tmp_path / "student_modes_smoke.md").read_text()


def test_teacher_methods_benchmark_reports_mean_and_std(tmp_path):
    run_script("benchmarks/teacher_methods.py", "--methods", "onehot", "lspp", "--seeds", "0", "1", "--epochs", "1",
               "--results-dir", str(tmp_path), "--", "--max-steps", "2")
    report = json.loads((tmp_path / "teacher_methods_digits.json").read_text())
    assert [row["variant"] for row in report["results"]] == ["onehot", "lspp"]
    assert all(len(row["runs"]) == 2 for row in report["results"])
    assert "+-" in (tmp_path / "teacher_methods_digits.md").read_text()


def test_student_accuracy_benchmark_runs_three_modes_over_seeds(tmp_path):
    run_script("benchmarks/student_accuracy.py", "--seeds", "0", "1", "--results-dir", str(tmp_path),
               "--", "--epochs", "1", "--max-steps", "2")
    report = json.loads((tmp_path / "student_accuracy_digits.json").read_text())
    assert [row["variant"] for row in report["results"]] == ["proxy (PT-LS++)", "kd (Hinton)", "plain 1-hot"]
    assert all(len(row["runs"]) == 2 for row in report["results"])
