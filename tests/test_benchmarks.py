"""The benchmark scripts run end to end (a few steps on digits), so they cannot rot."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import ROOT
ONE_RUN = {"test_top1": 0.5, "test_nll": 1.0, "test_ece": 0.1, "test_mean_confidence": 0.6, "train_seconds": 10.0}  # what a table keeps of a run


def benchmark_module(name: str) -> ModuleType:
    """A script of benchmarks/ imported as a module (they import their neighbours by plain name)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


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


def test_augment_cost_benchmark_reports_every_augmentation(tmp_path, cifar10_subset):
    run_script("benchmarks/augment_cost.py", "--data-dir", str(cifar10_subset), "--model", "tiny_cnn", "--batch-size", "16",
               "--steps", "2", "--batches", "2", "--repeats", "1", "--results-dir", str(tmp_path))
    report = json.loads((tmp_path / "augment_cost.json").read_text())
    assert set(report["op_ms"]) == {"crop", "flip", "cutout", "randaugment", "mixup", "cutmix", "crop,flip,cutout,mixup,cutmix"}
    assert all(value["min"] > 0 for value in report["op_ms"].values()) and len(report["step_ratio"]) == 2


def test_paper_experiments_runner_fills_every_table_and_skips_finished_runs(tmp_path, cifar10_subset):
    common = ["--data-dir", str(cifar10_subset), "--smoke", "4", "--runs-dir", str(tmp_path / "runs"),
              "--results-dir", str(tmp_path), "--images-dir", str(tmp_path / "images")]
    args = [*common, "--seeds", "0"]
    run_script("benchmarks/paper_cifar10.py", "table3", "--methods", "onehot", "ols", "lspp", *args)
    first = json.loads((tmp_path / "paper_table3_small.json").read_text())
    assert [len(first["rows"][m]) for m in ("onehot", "ols", "lspp", "ls")] == [1, 1, 1, 0]
    run_script("benchmarks/paper_cifar10.py", "all", "--methods", "onehot", *args)
    again = json.loads((tmp_path / "paper_table3_small.json").read_text())
    assert again["rows"]["lspp"] == first["rows"]["lspp"]  # skipped, not re-trained
    for name in ("fig3", "table5", "table6", "table6kd", "table7"):
        assert (tmp_path / f"paper_{name}.md").exists(), name
    assert len(json.loads((tmp_path / "paper_table6.json").read_text())["rows"]["proxy: OLS matrix"]) == 1
    extended = json.loads((tmp_path / "paper_table6kd.json").read_text())["rows"]
    assert all(len(runs) == 1 for runs in extended.values()), extended  # every row, the stored soft labels' too
    assert (tmp_path / "images" / "fig3_cifar10_lspp_cmatrix.png").exists()
    rows = json.loads((tmp_path / "paper_table7.json").read_text())["rows"]
    runs = sorted(p.name for p in (tmp_path / "runs").rglob("*") if p.is_dir())
    (tmp_path / "paper_table7.md").unlink()
    run_script("benchmarks/paper_cifar10.py", "table7", "--report-only", "--seeds", "0", "1", *common)
    assert json.loads((tmp_path / "paper_table7.json").read_text())["rows"] == rows and (tmp_path / "paper_table7.md").exists()
    assert sorted(p.name for p in (tmp_path / "runs").rglob("*") if p.is_dir()) == runs  # nothing trained (seed 1 neither)


def test_paper_runner_leaves_whole_tables_when_a_sitting_is_stopped(tmp_path, monkeypatch):
    # Stopping a long sitting (SIGTERM, Ctrl-C) must not leave a results file holding only the
    # runs that sitting had visited: it is written from every finished run before training and
    # after each run. Training is faked here; the runner's bookkeeping is what is tested.
    paper = benchmark_module("paper_cifar10")
    (tmp_path / "data" / "train").mkdir(parents=True)
    args = argparse.Namespace(seeds=[0], methods=None, runs_dir=tmp_path / "runs", data_dir=tmp_path / "data",
                              results_dir=tmp_path, images_dir=tmp_path, report_only=False, smoke=None)
    monkeypatch.setattr(paper, "ARGS", args, raising=False)

    def finish(out: Path) -> None:
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(ONE_RUN))

    for method in paper.TABLE3_METHODS:  # an earlier sitting finished seed 1 of every method, and 1-hot's seed 0
        finish(args.runs_dir / "small" / f"{method}-s1")
    finish(args.runs_dir / "small" / "onehot-s0")
    trained = []

    def train(self, command: str, out: Path, flags: list[str]) -> bool:
        if trained:
            raise KeyboardInterrupt  # the sitting is stopped during its second run
        finish(out)
        trained.append(out.name)
        return True

    monkeypatch.setattr(paper.Runner, "train", train)
    with pytest.raises(KeyboardInterrupt):
        paper.sitting(paper.Runner(args), paper.table3, "small")
    assert trained == ["ls-s0"]
    rows = json.loads((tmp_path / "paper_table3_small.json").read_text())["rows"]
    assert {method: len(runs) for method, runs in rows.items()} == {m: 2 if m in ("onehot", "ls") else 1 for m in paper.TABLE3_METHODS}
    assert "| zipf | 0.5000 (n=1) |" in (tmp_path / "paper_table3_small.md").read_text()


def test_flip_digits_benchmark_runs(tmp_path):
    run_script("benchmarks/flip_digits.py", "--seeds", "0", "--epochs", "1", "--results-dir", str(tmp_path))
    assert len(json.loads((tmp_path / "flip_digits.json").read_text())["results"]) == 2


def test_throughput_benchmark_smoke_measures_every_part(tmp_path):
    run_script("benchmarks/throughput.py", "all", "--smoke", "--results-dir", str(tmp_path))
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert list(report["parts"]) == ["teacher", "loss", "students", "memory", "startup", "first-step"]

    def numbers(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from numbers(item)
        elif isinstance(value, list):
            for item in value:
                yield from numbers(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield value

    for name, part in report["parts"].items():
        values = list(numbers(part["results"]))
        assert values and all(math.isfinite(v) and v > 0 for v in values), name
        assert part["smoke"] and part["machine"]["torch_threads"] >= 1
    parts = report["parts"]
    assert set(parts["teacher"]["results"]) == {"alexnet", "lenet"}
    assert set(parts["loss"]["results"]["loss_only"]["10"]["step_seconds"]) == {"ce", "lspp", "reference"}
    assert {"ratio_proxy_over_plain", "ratio_kd_over_plain"} <= set(parts["students"]["results"])
    assert len(parts["startup"]["results"]) == 4
    markdown = (tmp_path / "throughput.md").read_text()
    assert all(f"## {name}:" in markdown for name in parts) and "SMOKE RUN" in markdown


def test_table_cells_show_mean_std_timings_min_median_and_seed_counts():
    seeds = benchmark_module("_seeds")
    cell, markdown_table = seeds.cell, seeds.markdown_table
    assert cell([], 4) == "-"
    assert cell([0.61], 4) == "0.6100 (n=1)"  # no spread from one seed
    assert cell([0.5, 0.7, 0.6], 2) == "0.60 +- 0.10 (n=3)"  # sample std
    assert cell([300.0, 100.0, 250.0], 0, timing=True) == "100 / 250 (n=3)"
    lines = markdown_table({"lspp": [ONE_RUN], "ols": []}, "method")
    assert lines[0].startswith("| method | top-1 |") and lines[2].startswith("| lspp | 0.5000 (n=1) |")
    assert lines[3] == "| ols | - | - | - | - | - |"


def test_readme_paper_tables_are_the_committed_results():
    # The copies of the paper tables in README.md and docs/*.md are made by `paper_cifar10.py
    # readme` from benchmarks/results/paper_*.json, never typed: after new results, rerun it.
    # Every block, in every file, must be the results; every table must appear somewhere.
    paper_cifar10 = benchmark_module("paper_cifar10")
    documents = paper_cifar10.documents(ROOT)
    assert ROOT / "README.md" in documents and ROOT / "docs" / "results.md" in documents
    blocks = paper_cifar10.readme_blocks(ROOT / "benchmarks" / "results")
    assert set(blocks) == set(paper_cifar10.FIRST_COLUMN)
    for name, block in blocks.items():
        found = []
        for path in documents:
            for match in paper_cifar10.block_pattern(name).finditer(path.read_text()):
                where = path.relative_to(ROOT)
                assert match.group(2) == block, f"{where}'s {name} is not benchmarks/results/paper_{name}.json: run paper_cifar10.py readme"
                found.append(where)
        assert found, f"neither README.md nor docs/*.md has the <!-- paper:{name} --> block"
    for path in documents:  # no stray, unclosed or misspelt markers that the pattern would not see
        text = path.read_text()
        for name in set(re.findall(r"<!-- /?paper:([\w-]+) -->", text)):
            assert name in blocks, f"{path.relative_to(ROOT)}: <!-- paper:{name} --> is no table paper_cifar10.py makes"
            blocks_here = len(paper_cifar10.block_pattern(name).findall(text))
            assert text.count(f"<!-- paper:{name} -->") == text.count(f"<!-- /paper:{name} -->") == blocks_here, (
                f"{path.relative_to(ROOT)}: unpaired <!-- paper:{name} --> markers")


def test_transfer_benchmark_fills_its_table_and_skips_finished_runs(tmp_path, cifar10_subset):
    args = ["benchmarks/transfer_cifar10.py", "--data-dir", str(cifar10_subset), "--smoke", "--seeds", "0",
            "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]
    run_script(*args)
    rows = json.loads((tmp_path / "transfer_cifar10.json").read_text())["rows"]
    assert len(rows) == 7 and all(len(runs) == 1 for runs in rows.values()), rows  # 4 teachers, 3 students, seed 0
    config = json.loads((tmp_path / "runs" / "lspp-pretrained-s0" / "config.json").read_text())
    assert config["pretrained_path"].endswith("pretrain-source5/model.safetensors")
    assert config["class_names"] == ["dog", "frog", "horse", "ship", "truck"]
    before = (tmp_path / "runs" / "student-kd-s0" / "metrics.json").stat().st_mtime_ns
    run_script(*args)  # everything finished: nothing trains again
    assert (tmp_path / "runs" / "student-kd-s0" / "metrics.json").stat().st_mtime_ns == before


def test_streaming_pipeline_benchmark_compares_both_pipelines(tmp_path, cifar10_subset):
    run_script("benchmarks/streaming_pipeline.py", "--data-dir", str(cifar10_subset), "--size", "72", "--per-class", "20",
               "--repeats", "1", "--workers", "1", "--results-dir", str(tmp_path))
    report = json.loads((tmp_path / "streaming_pipeline.json").read_text())
    assert set(report["runs"]) == {"ours", "torchvision"} and report["ours_over_torchvision_median"] > 0
    assert all(run["images"] > 0 and run["peak_memory_mb"] > 0 for runs in report["runs"].values() for run in runs)
    assert "Where ours spends a batch" in (tmp_path / "streaming_pipeline.md").read_text()
