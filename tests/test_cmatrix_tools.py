"""`kd cmatrix validate/show/diff/subset/merge/remap` end to end, on files made by `kd train-teacher`."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lspp_kd.cli.cmatrix_display import top_neighbours
from kd.cmatrix.artifact import CMatrix, load_cmatrix, save_cmatrix, validate
from kd.cmatrix.diff import diff, js_divergence_bits, spearman
from kd.cmatrix.ops import parse_sources, subset
from tests.helpers import (
    DIGITS, ENV, KD, PickleTrap, assert_one_line_error, hand_made_run, kd, kd_in_process, make_image_folder, sha256,
)

TRAIN = ["--epochs", "1", "--max-steps", "30", "--batch-size", "32"]
FOLDER_CLASSES = ("ant", "bee", "cat", "dog")


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Three real C-matrices: digits with seeds 1 and 2, and a 4-class ImageFolder tree.

    The three `kd train-teacher` runs go in parallel (they are small and mostly start-up).
    """
    root = tmp_path_factory.mktemp("teachers")
    folder = make_image_folder(root / "folder_data", classes=FOLDER_CLASSES, per_class=4, size=8)
    runs = {
        "seed1": ["--seed", "1"],
        "seed2": ["--seed", "2"],
        "folder": ["--dataset", "imagefolder", "--data-dir", str(folder)],
    }
    procs = {
        name: subprocess.Popen(
            [KD, "train-teacher", "--out", str(root / name), *TRAIN, *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )
        for name, flags in runs.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    files = {name: root / name / "cmatrix.safetensors" for name in runs}
    files["folder_data"] = folder
    return files


# ---------------------------------------------------------------------------------------------
# validate


def test_validate_reports_ok_for_real_files(teachers):
    result = kd("cmatrix", "validate", teachers["seed1"], teachers["seed2"], "--checksum")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, ("seed1", "seed2")):
        assert line.startswith(f"OK   {teachers[name]}: K=10 source=lspp dataset=digits teacher=small_cnn")
        assert "alpha=0.1" in line and f"sha256={sha256(teachers[name])}" in line


def _bad_files(good: Path, dest: Path) -> dict[str, tuple[Path, str]]:
    """The invalid-file battery: name -> (file, a fragment its FAIL reason must contain)."""
    cm = load_cmatrix(good)
    dest.mkdir()
    cases: dict[str, tuple[Path, str]] = {}

    def write(name: str, fragment: str, tensors: dict | None = None, meta: dict | None = None) -> None:
        path = dest / f"{name}.safetensors"
        t = {"cmatrix": cm.probs.clone(), "logits": cm.logits.clone()} if tensors is None else tensors
        save_file(t, str(path), metadata=cm.metadata() if meta is None else meta)
        cases[name] = (path, fragment)

    data = good.read_bytes()
    (dest / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (dest / "truncated.safetensors", "not a valid safetensors file")
    (dest / "random.safetensors").write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    cases["random"] = (dest / "random.safetensors", "not a valid safetensors file")
    (dest / "text.safetensors").write_text("class,prob\ncat,0.5\n")
    cases["text"] = (dest / "text.safetensors", "not a valid safetensors file")

    write("wrong_shape", "has shape (10, 9), expected (10, 10)",
          tensors={"cmatrix": cm.probs[:, :9].contiguous(), "logits": cm.logits.clone()})
    nan = cm.probs.clone()
    nan[3, 4] = float("nan")
    write("nan", "non-finite", tensors={"cmatrix": nan, "logits": cm.logits.clone()})
    negative = cm.probs.clone()
    negative[2, 5] -= 0.2
    negative[2, 6] += 0.2
    write("negative", "negative probability", tensors={"cmatrix": negative, "logits": cm.logits.clone()})
    diagonal = cm.probs.clone()
    diagonal[1, 1] = 0.1
    diagonal[1] /= diagonal[1].sum()
    write("diagonal", "diagonal must be zero", tensors={"cmatrix": diagonal, "logits": cm.logits.clone()})
    rows = cm.probs.clone()
    rows[7] *= 0.5
    write("row_sum", "row '7' sums to 0.5", tensors={"cmatrix": rows, "logits": cm.logits.clone()})

    meta = cm.metadata()
    del meta["alpha"]
    write("missing_key", "missing metadata key 'alpha'", meta=meta)
    write("no_metadata", "no metadata", meta={})
    meta = cm.metadata()
    meta["class_names"] = '["0", "1", "2"'
    write("class_names_json", "class_names is not valid JSON", meta=meta)
    meta = cm.metadata()
    meta["class_names"] = json.dumps([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    write("class_names_type", "class_names must be a list of strings", meta=meta)
    meta = cm.metadata()
    meta["class_names"] = json.dumps(DIGITS[:9])
    write("k_mismatch", "class_names lists 9 names but num_classes is 10", meta=meta)
    meta = cm.metadata()
    meta["format_version"] = "2.0"
    write("major_version", "upgrade lspp-kd", meta=meta)
    return cases


def test_validate_reports_every_bad_file_and_still_reports_good_ones(teachers, tmp_path):
    cases = _bad_files(teachers["seed1"], tmp_path / "bad")
    files = [teachers["seed1"], *(path for path, _ in cases.values()), teachers["seed2"]]
    result = kd("cmatrix", "validate", *files)
    assert result.returncode == 1
    assert_one_line_error(result, f"{len(cases)} of {len(files)} file(s) failed validation", returncode=1)
    lines = result.stdout.splitlines()
    assert len(lines) == len(files), result.stdout
    assert lines[0].startswith(f"OK   {teachers['seed1']}: K=10")
    assert lines[-1].startswith(f"OK   {teachers['seed2']}: K=10")
    for line, (name, (path, fragment)) in zip(lines[1:-1], cases.items()):
        assert line.startswith(f"FAIL {path}: "), (name, line)
        assert fragment in line, (name, line)


def test_pickle_files_are_never_executed(teachers, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(PickleTrap(control)))
    assert control.exists()  # the trap works when unpickled

    marker = tmp_path / "marker"
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(pickle.dumps({"cmatrix": PickleTrap(marker)}))
    zipped = tmp_path / "torch.safetensors"
    torch.save({"cmatrix": PickleTrap(marker)}, zipped)
    assert not marker.exists()
    result = kd("cmatrix", "validate", plain, zipped)
    assert result.returncode == 1
    for line, path in zip(result.stdout.splitlines(), (plain, zipped)):
        assert line.startswith(f"FAIL {path}: ") and "not a valid safetensors file" in line
    assert_one_line_error(kd("cmatrix", "show", zipped), "not a valid safetensors file", returncode=1)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# show, diff


def test_show_json_matches_the_library(teachers):
    result = kd("cmatrix", "show", teachers["seed1"], "--top", "4", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    cm = load_cmatrix(teachers["seed1"])
    assert shown["class_names"] == DIGITS and shown["num_classes"] == 10
    assert shown["alpha"] == pytest.approx(0.1) and shown["source"] == "lspp" and shown["dataset"] == "digits"
    assert shown["teacher_top1"] == pytest.approx(cm.teacher_top1)
    assert shown["metadata"] == cm.metadata()
    expected = {name: [[other, p] for other, p in ns] for name, ns in top_neighbours(cm, 4)}
    assert list(shown["neighbours"]) == DIGITS
    for name, neighbours in expected.items():
        assert [n for n, _ in shown["neighbours"][name]] == [n for n, _ in neighbours]
        assert [p for _, p in shown["neighbours"][name]] == pytest.approx([p for _, p in neighbours])


def test_diff_of_a_file_with_itself_is_zero(teachers):
    result = kd("cmatrix", "diff", teachers["seed1"], teachers["seed1"], "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["shared_classes"] == 10 and summary["mean_js_bits"] == 0.0
    assert summary["top1_agreement"] == 1.0 and summary["mean_spearman"] == pytest.approx(1.0)
    assert summary["only_in_a"] == [] and summary["only_in_b"] == []


def test_diff_of_two_teachers_is_finite_and_in_range(teachers):
    result = kd("cmatrix", "diff", teachers["seed1"], teachers["seed2"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 + 10 + 1 and lines[-1].startswith("summary: mean JS")
    assert "JS divergence in bits" in lines[0]
    d = diff(load_cmatrix(teachers["seed1"]), load_cmatrix(teachers["seed2"]))
    assert len(d.classes) == 10
    for c in d.classes:
        assert math.isfinite(c.js_bits) and 0.0 <= c.js_bits <= 1.0
        assert c.spearman is None or -1.0 <= c.spearman <= 1.0
        assert c.top1_a in DIGITS and c.top1_b in DIGITS and c.top1_a != c.name
    assert 0.0 < d.mean_js_bits <= 1.0 and 0.0 <= d.top1_agreement <= 1.0


def test_diff_needs_three_shared_classes(teachers):
    assert_one_line_error(kd("cmatrix", "diff", teachers["seed1"], teachers["folder"]), "share 0 class name(s)", returncode=1)


# ---------------------------------------------------------------------------------------------
# subset, merge, remap


def test_subset_keeps_proportions_and_records_provenance(teachers, tmp_path):
    out = tmp_path / "three.safetensors"
    result = kd("cmatrix", "subset", teachers["seed1"], "--classes", "8, 3,5", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: K=3 source=subset")
    sub, orig = load_cmatrix(out), load_cmatrix(teachers["seed1"])  # load_cmatrix fully validates
    assert sub.class_names == ("8", "3", "5") and sub.source == "subset"
    assert torch.allclose(sub.probs.sum(dim=1), torch.ones(3), atol=1e-6)
    idx = [8, 3, 5]
    kept = orig.probs.double()[idx][:, idx]
    expected = kept / kept.sum(dim=1, keepdim=True)
    assert torch.allclose(sub.probs.double(), expected, atol=1e-6)
    # ratios between kept entries are the original's
    assert float(sub.probs[0, 1] / sub.probs[0, 2]) == pytest.approx(float(orig.probs[8, 3] / orig.probs[8, 5]), rel=1e-5)
    (source,) = parse_sources(sub)
    assert source["sha256"] == sha256(teachers["seed1"]) and source["file"] == "cmatrix.safetensors"
    assert source["source"] == "lspp" and source["num_classes"] == 10
    assert sub.dataset == "digits" and sub.alpha == pytest.approx(orig.alpha)

    assert_one_line_error(
        kd("cmatrix", "subset", teachers["seed1"], "--classes", "3,x", "--out", tmp_path / "x.safetensors"),
        "no class 'x'", returncode=1
    )
    assert not (tmp_path / "x.safetensors").exists()


def test_merge_aligns_by_name_and_averages(teachers, tmp_path):
    reversed_order = tmp_path / "reversed.safetensors"
    save_cmatrix(reversed_order, subset(load_cmatrix(teachers["seed1"]), list(reversed(DIGITS))))
    # seed2 re-ordered to another file's class order (remap --classes-from FILE)
    b_rev = tmp_path / "b_rev.safetensors"
    result = kd("cmatrix", "remap", teachers["seed2"], "--classes-from", reversed_order, "--out", b_rev)
    assert result.returncode == 0, result.stderr
    a, b, remapped = load_cmatrix(teachers["seed1"]), load_cmatrix(teachers["seed2"]), load_cmatrix(b_rev)
    perm = list(reversed(range(10)))
    assert remapped.class_names == tuple(reversed(DIGITS)) and remapped.source == "remap"
    assert torch.equal(remapped.probs, b.probs[perm][:, perm])
    assert parse_sources(remapped)[0]["sha256"] == sha256(teachers["seed2"])

    merged_path = tmp_path / "merged.safetensors"
    result = kd("cmatrix", "merge", teachers["seed1"], b_rev, "--out", merged_path)
    assert result.returncode == 0, result.stderr
    merged = load_cmatrix(merged_path)
    assert merged.class_names == tuple(DIGITS) and merged.source == "merge"
    by_hand = (a.probs.double() + b.probs.double()) / 2  # both in the first file's (digit) order
    assert torch.allclose(merged.probs.double(), by_hand, atol=1e-6)
    assert merged.alpha == pytest.approx(0.1) and merged.teacher_top1 is None
    assert [s["sha256"] for s in parse_sources(merged)] == [sha256(teachers["seed1"]), sha256(b_rev)]


def test_merge_refuses_different_class_sets(teachers, tmp_path):
    out = tmp_path / "merged.safetensors"
    sub = tmp_path / "sub.safetensors"
    save_cmatrix(sub, subset(load_cmatrix(teachers["seed1"]), ["0", "1", "2"]))
    assert_one_line_error(kd("cmatrix", "merge", teachers["seed1"], sub, "--out", out),
                          "different class names", "only in", returncode=1)
    assert not out.exists()


def test_remap_and_validate_against_an_imagefolder_dataset(teachers, tmp_path):
    data = teachers["folder_data"]
    shuffled = tmp_path / "shuffled.safetensors"
    save_cmatrix(shuffled, subset(load_cmatrix(teachers["folder"]), ["dog", "bee", "ant", "cat"]))
    back = tmp_path / "back.safetensors"
    result = kd("cmatrix", "remap", shuffled, "--classes-from", "imagefolder", "--data-dir", data, "--out", back)
    assert result.returncode == 0, result.stderr
    original, restored = load_cmatrix(teachers["folder"]), load_cmatrix(back)
    assert restored.class_names == FOLDER_CLASSES
    assert torch.allclose(restored.probs, original.probs, atol=1e-6)
    assert parse_sources(restored)[0]["sha256"] == sha256(shuffled)

    result = kd("cmatrix", "validate", back, shuffled, "--classes-from", "imagefolder", "--data-dir", data)
    ok, fail = result.stdout.splitlines()
    assert result.returncode == 1 and ok.startswith(f"OK   {back}: K=4 source=remap")
    assert fail.startswith(f"FAIL {shuffled}: ") and "different order" in fail and "kd cmatrix remap" in fail


def test_outputs_are_never_overwritten_without_overwrite(teachers, tmp_path):
    out = tmp_path / "taken.safetensors"
    out.write_text("keep me")
    assert_one_line_error(
        kd("cmatrix", "subset", teachers["seed1"], "--classes", "1,2,3", "--out", out), "already exists", "--overwrite", returncode=1
    )
    assert out.read_text() == "keep me"
    result = kd("cmatrix", "merge", teachers["seed1"], teachers["seed2"], "--out", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert load_cmatrix(out).source == "merge"
    assert [p.name for p in tmp_path.iterdir()] == ["taken.safetensors"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------
# library pieces (no subprocess)


def test_spearman_and_js_on_known_values():
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ties get average ranks: ranks (0.5, 0.5, 2) vs (0, 1, 2) -> rho = sqrt(3)/2
    assert spearman(torch.tensor([1.0, 1.0, 5.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(math.sqrt(3) / 2)
    assert spearman(torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.8])) is None
    assert js_divergence_bits(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1.0)
    assert js_divergence_bits(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])) == 0.0


def test_subset_of_a_posthoc_matrix_with_zero_mass_rows_is_valid():
    probs = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.6, 0.0]])
    cm = CMatrix.from_probs(probs, ["a", "b", "c", "d"], alpha=0.1)
    sub = subset(cm, ["a", "c", "d"])
    validate(sub)
    assert sub.source == "subset" and parse_sources(sub)[0]["source"] == "posthoc"
    assert torch.allclose(sub.probs[0], torch.tensor([0.0, 0.5, 0.5]))  # a had no mass on c, d: uniform
    assert torch.allclose(sub.probs[1], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(sub.probs[2], torch.tensor([0.25, 0.75, 0.0]))


def test_dataset_class_names_without_decoding_images(tmp_path):
    from kd.data.datasets import dataset_class_names
    from kd.errors import KDError

    assert dataset_class_names("digits") == DIGITS
    data = make_image_folder(tmp_path / "data", classes=("bee", "ant"), per_class=1, splits=("train",))
    assert dataset_class_names("imagefolder", data) == ["ant", "bee"]
    with pytest.raises(KDError, match="no train/ folder"):
        dataset_class_names("imagefolder", tmp_path)
    with pytest.raises(KDError, match="unknown dataset"):
        dataset_class_names("imagenet-9000")


# ---------------------------------------------------------------------------------------------
# from-teacher: the run's own data


def test_run_data_repeats_the_runs_train_per_class_and_val_split():
    from kd.data.datasets import load_dataset
    from kd.data.splits import train_per_class, validation_split
    from kd.training.run_data import load_run_data

    config = {"dataset": "digits", "image_size": 8, "class_names": DIGITS, "seed": 3,
              "train_per_class": 40, "val_split": 0.25}
    data = load_run_data("run", config)
    whole = load_dataset("digits")
    expected = validation_split(train_per_class(whole, 40, 3), 0.25, 3)  # as kd.training.run.prepare_run does
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(data, split).images, getattr(expected, split).images), split
        assert torch.equal(getattr(data, split).labels, getattr(expected, split).labels), split
    assert len(data.train) == 300 and len(data.val) == 100
    assert torch.equal(data.test.images, whole.test.images)  # the test split the run's metrics.json reports
    other = load_run_data("run", config, dataset="digits")  # another dataset given: used whole
    assert len(other.train) == len(whole.train) and other.val is None


def test_from_teacher_of_a_run_with_val_split_leaves_out_its_validation_images(tmp_path):
    """The post-hoc C-matrix of a run trained with --train-per-class and --val-split averages over the
    images the run trained on: not over the validation images it held out, nor over the whole dataset."""
    from accelerate import Accelerator

    from kd.cmatrix.posthoc import estimate_cmatrix
    from kd.data.datasets import load_dataset
    from kd.data.splits import train_per_class, validation_split
    from kd.training.rundir import load_run_model

    run = hand_made_run(tmp_path / "run", train_per_class=40, val_split=0.5)
    out = tmp_path / "posthoc.safetensors"
    result = kd_in_process("cmatrix", "from-teacher", str(run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    net, _ = load_run_model(run)
    subset = train_per_class(load_dataset("digits"), 40, 3)
    trained_on, with_val = validation_split(subset, 0.5, 3), subset
    accelerator = Accelerator(cpu=True)
    expected = estimate_cmatrix(net, trained_on, 64, accelerator)
    wrong = estimate_cmatrix(net, with_val, 64, accelerator)
    assert (expected - wrong).abs().max() > 1e-3  # the test can tell the two apart
    torch.testing.assert_close(load_cmatrix(out).probs, expected)
