"""benchmarks/gpu_smoke.py, the one command a session lent a GPU runs, works end to end (its --dry-run, on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ENV, ROOT

SCRIPT = "benchmarks/gpu_smoke.py"
CHECKS = {
    "install", "teacher_bf16", "teacher_fp16", "teacher_ols", "student_proxy_mix", "student_kd",
    "imagefolder_randaugment", "compile", "resume_bitwise", "teacher_epoch_benchmark", "reference_pipeline", "sync_probe",
    "finetune_bf16",
}


@pytest.mark.slow
def test_dry_run_writes_every_check_and_passes(tmp_path):
    out = tmp_path / "out"
    # One check at a time and one thread each (ENV): the suite's other worker shares the two cores,
    # and its timed tests (the two-minute digits run) must not lose them to oversubscription.
    result = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--jobs", "1", "--out", str(out), "--work-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    report = json.loads((out / "gpu_smoke.json").read_text())
    failed = {name: check.get("error") for name, check in report["checks"].items() if not check["ok"]}
    assert result.returncode == 0 and report["ok"], (failed, result.stdout[-3000:], result.stderr[-3000:])
    assert set(report["checks"]) == CHECKS
    assert {"torch", "accelerate", "cuda_available", "python"} <= set(report["environment"])
    checks = report["checks"]
    for name in ("teacher_bf16", "teacher_ols", "student_proxy_mix", "student_kd", "imagefolder_randaugment", "compile", "finetune_bf16"):
        command = checks[name]["commands"][0]
        assert command["returncode"] == 0 and command["seconds"] > 0 and command["command"].startswith("kd "), name
        assert 0 <= checks[name]["metrics"]["test_top1"] <= 1, name
    assert checks["teacher_bf16"]["metrics"]["mixed_precision"] == "bf16"
    assert checks["teacher_fp16"]["commands"][0]["returncode"] != 0  # the CPU's expected one-line refusal
    assert "fp16" in checks["teacher_fp16"]["message"]
    assert checks["resume_bitwise"]["a_vs_resumed"]["bitwise_equal"] and checks["resume_bitwise"]["resumed_from_step"] > 0
    assert checks["teacher_epoch_benchmark"]["report"]["images_per_second"] > 0
    assert set(checks["reference_pipeline"]["models"]) == {"alexnet", "lenet"}
    assert checks["sync_probe"]["status"] == "skipped" and len(checks["sync_probe"]["configs"]) == 4
    assert (out / "gpu_smoke.log").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_smoke.json", "gpu_smoke.log"]  # what comes back from a device session
    assert "OK" in result.stdout and "resume_bitwise" in result.stdout  # the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without a GPU")
def test_without_a_gpu_and_without_dry_run_it_still_writes_the_json_and_fails(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--work-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "gpu_smoke.json").read_text())
    assert result.returncode == 1 and not report["ok"]
    assert set(report["checks"]) == CHECKS and all("no CUDA device" in check["error"] for check in report["checks"].values())
