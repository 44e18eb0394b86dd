"""Tests for the cmatrix.safetensors artifact (kd/cmatrix.py)."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

import kd
from lspp_kd.cli.cmatrix_display import format_show, top_neighbours
from kd.cmatrix.artifact import (
    FORMAT_NAME,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    SOURCES,
    CMatrix,
    CMatrixError,
    check_class_names,
    load_cmatrix,
    remap_by_name,
    save_cmatrix,
    validate,
)
from kd.losses import cmatrix_from_logits, insert_diagonal
from tests.helpers import PickleTrap, assert_one_line_kderror

NAMES = ("cat", "dog", "deer", "frog")


def make_cm(k: int = 4, seed: int = 0, **kw) -> CMatrix:
    names = NAMES if k == 4 else tuple(f"class{i}" for i in range(k))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, k - 1, generator=gen) * 2.0
    kw.setdefault("dataset", "cifar10-mini")
    kw.setdefault("teacher_model", "resnet18")
    kw.setdefault("teacher_top1", 0.9375)
    return CMatrix.from_logits(logits, names, alpha=0.1, **kw)


def raw_parts(cm: CMatrix) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return {"cmatrix": cm.probs.clone(), "logits": cm.logits.clone()}, cm.metadata()


# ---------------------------------------------------------------------------------------------
# Construction and round trip


def test_from_logits_zeros_gives_uniform_off_diagonal() -> None:
    cm = CMatrix.from_logits(torch.zeros(5, 4), [f"c{i}" for i in range(5)], alpha=0.2)
    assert cm.probs.dtype == torch.float32 and cm.probs.shape == (5, 5)
    assert cm.logits.dtype == torch.float32 and cm.logits.shape == (5, 4)
    expected = torch.full((5, 5), 0.25)
    expected.fill_diagonal_(0.0)
    assert torch.allclose(cm.probs, expected, atol=1e-7)
    assert torch.all(cm.probs.diagonal() == 0)
    assert cm.source == "lspp" and cm.num_classes == 5 and cm.class_names == tuple(f"c{i}" for i in range(5))
    validate(cm)


def test_from_probs_round_trips_through_probs(tmp_path: Path) -> None:
    original = make_cm(seed=3)
    cm = CMatrix.from_probs(original.probs, NAMES, alpha=0.1)
    assert cm.source == "posthoc"
    assert torch.equal(cm.probs, original.probs)
    assert cm.logits.dtype == torch.float32 and cm.logits.shape == (4, 3)
    assert torch.allclose(cmatrix_from_logits(cm.logits), original.probs, atol=1e-6)
    validate(cm)
    save_cmatrix(tmp_path / "c.safetensors", cm)
    loaded = load_cmatrix(tmp_path / "c.safetensors")
    assert torch.equal(loaded.probs, original.probs)
    # And back through from_logits gives the same probabilities.
    again = CMatrix.from_logits(loaded.logits, NAMES, alpha=0.1)
    assert torch.allclose(again.probs, original.probs, atol=1e-6)


def test_from_probs_with_zero_entries_gets_finite_floored_logits() -> None:
    probs = torch.tensor(
        [[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]],
        dtype=torch.float64,
    )
    cm = CMatrix.from_probs(probs, ["a", "b", "c"], alpha=0.0)
    assert cm.probs.dtype == torch.float32
    assert torch.isfinite(cm.logits).all()
    assert math.isclose(float(cm.logits.min()), math.log(1e-12), rel_tol=1e-5)
    validate(cm)


def test_round_trip_is_bitwise_and_keeps_all_metadata(tmp_path: Path) -> None:
    cm = make_cm(seed=1, extra={"provenance": "teacher run 7", "note": "héllo ✓"})
    path = tmp_path / "cmatrix.safetensors"
    save_cmatrix(path, cm)
    loaded = load_cmatrix(path, expected_class_names=list(NAMES))
    assert torch.equal(loaded.probs.view(torch.int32), cm.probs.view(torch.int32))
    assert torch.equal(loaded.logits.view(torch.int32), cm.logits.view(torch.int32))
    assert loaded.probs.dtype == torch.float32 and loaded.logits.dtype == torch.float32
    assert loaded.metadata() == cm.metadata()
    for name in ("class_names", "alpha", "source", "dataset", "teacher_model", "teacher_top1", "toolkit_version", "created"):
        assert getattr(loaded, name) == getattr(cm, name), name
    assert dict(loaded.extra) == {"provenance": "teacher run 7", "note": "héllo ✓"}
    assert loaded.teacher_top1 == 0.9375 and loaded.alpha == 0.1


def test_metadata_keys_and_values() -> None:
    cm = make_cm(teacher_top1=None)
    meta = cm.metadata()
    assert set(REQUIRED_KEYS) <= set(meta)
    assert meta["format"] == FORMAT_NAME == "lspp-cmatrix"
    assert meta["format_version"] == FORMAT_VERSION == "1.0"
    assert meta["num_classes"] == "4"
    assert json.loads(meta["class_names"]) == list(NAMES)
    assert float(meta["alpha"]) == 0.1
    assert meta["teacher_top1"] == ""
    assert meta["source"] == "lspp"
    assert meta["toolkit_version"] == kd.__version__
    assert meta["created"].endswith("Z") and "T" in meta["created"]
    assert all(isinstance(v, str) for v in meta.values())


def test_unknown_teacher_top1_round_trips_as_none(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_cmatrix(path, make_cm(teacher_top1=None))
    assert load_cmatrix(path).teacher_top1 is None


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_is_accepted(tmp_path: Path, source: str) -> None:
    path = tmp_path / "c.safetensors"
    save_cmatrix(path, make_cm(source=source))
    assert load_cmatrix(path).source == source


def test_newer_minor_version_is_read_and_unknown_keys_kept(tmp_path: Path) -> None:
    tensors, meta = raw_parts(make_cm())
    meta["format_version"] = "1.3"
    meta["future_key"] = "something new"
    path = tmp_path / "c.safetensors"
    save_file(tensors, str(path), metadata=meta)
    loaded = load_cmatrix(path)
    assert loaded.extra["future_key"] == "something new"
    assert torch.equal(loaded.probs, tensors["cmatrix"])


def test_extra_tensors_in_file_are_ignored(tmp_path: Path) -> None:
    tensors, meta = raw_parts(make_cm())
    tensors["something_else"] = torch.zeros(2)
    path = tmp_path / "c.safetensors"
    save_file(tensors, str(path), metadata=meta)
    loaded, expected = load_cmatrix(path), make_cm()
    assert torch.equal(loaded.probs, expected.probs) and loaded.class_names == expected.class_names


# ---------------------------------------------------------------------------------------------
# Rejected files


def _set(key: str, value: str) -> Callable:
    def mutate(tensors: dict, meta: dict) -> None:
        meta[key] = value

    return mutate


def _drop(key: str) -> Callable:
    def mutate(tensors: dict, meta: dict) -> None:
        del meta[key]

    return mutate


def _tensor(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def mutate(tensors: dict, meta: dict) -> None:
        tensors[name] = fn(tensors[name].clone())

    return mutate


def _del_tensor(name: str) -> Callable:
    def mutate(tensors: dict, meta: dict) -> None:
        del tensors[name]

    return mutate


def _set_at(i: int, j: int, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t[i, j] = value
        return t

    return fn


def _negative_prob(t: torch.Tensor) -> torch.Tensor:
    # Row 1 ("dog"): move mass so one entry is negative but the row still sums to 1.
    t[1, 0] += 0.5 + float(t[1, 2])
    t[1, 2] = -0.5
    return t


def _nonzero_diagonal(t: torch.Tensor) -> torch.Tensor:
    # Row 2 ("deer"): a diagonal entry, with the row renormalised so only the diagonal is wrong.
    t[2] *= 0.9
    t[2, 2] = 0.1
    return t


def _bad_row_sum(t: torch.Tensor) -> torch.Tensor:
    t[3] *= 1.01  # "frog"
    return t


def _swap_in_row(t: torch.Tensor) -> torch.Tensor:
    # Row 0 ("cat"): swap two off-diagonal probabilities; rows still sum to 1, but no longer
    # match softmax(logits).
    a, b = float(t[0, 1]), float(t[0, 3])
    assert abs(a - b) > 1e-3
    t[0, 1], t[0, 3] = b, a
    return t


INVALID_CASES = [
    pytest.param(_set("format", "something-else"), ["format", "something-else", "lspp-cmatrix"], id="format-wrong"),
    pytest.param(_set("format_version", "2.0"), ["written by format version 2.0; this toolkit reads 1.x — upgrade lspp-kd"], id="major-2"),
    pytest.param(_set("format_version", "10.1"), ["written by format version 10.1", "upgrade lspp-kd"], id="major-10"),
    pytest.param(_set("format_version", "0.9"), ["format version 0.9", "1.x"], id="major-0"),
    pytest.param(_set("format_version", "1"), ["format_version", "malformed"], id="version-no-minor"),
    pytest.param(_set("format_version", "1.0.1"), ["format_version", "malformed"], id="version-three-parts"),
    pytest.param(_set("format_version", "one.zero"), ["format_version", "malformed"], id="version-words"),
    pytest.param(_set("format_version", ""), ["format_version", "malformed"], id="version-empty"),
    pytest.param(_set("num_classes", "four"), ["num_classes", "not an integer"], id="num-classes-word"),
    pytest.param(_set("num_classes", "4.0"), ["num_classes", "not an integer"], id="num-classes-float"),
    pytest.param(_set("num_classes", "-4"), ["num_classes", "not an integer"], id="num-classes-negative"),
    pytest.param(_set("num_classes", "1"), ["num_classes", "at least 2"], id="num-classes-one"),
    pytest.param(_set("num_classes", "3"), ["class_names", "4 names", "num_classes is 3"], id="num-classes-mismatch"),
    pytest.param(_set("class_names", "[cat, dog"), ["class_names", "not valid JSON"], id="names-not-json"),
    pytest.param(_set("class_names", '{"cat": 1}'), ["class_names", "list of strings"], id="names-not-list"),
    pytest.param(_set("class_names", '["cat", "dog", 3, "frog"]'), ["class_names", "list of strings"], id="names-not-strings"),
    pytest.param(_set("class_names", '["cat", "", "deer", "frog"]'), ["class_names[1]", "empty"], id="names-empty-string"),
    pytest.param(_set("class_names", '["cat", "dog", "cat", "frog"]'), ["'cat'", "more than once"], id="names-duplicate"),
    pytest.param(_set("class_names", '["cat", "dog", "deer"]'), ["class_names", "3 names", "num_classes is 4"], id="names-too-few"),
    pytest.param(_set("alpha", "abc"), ["alpha", "not a number"], id="alpha-word"),
    pytest.param(_set("alpha", "1.0"), ["alpha", "[0, 1)"], id="alpha-one"),
    pytest.param(_set("alpha", "-0.1"), ["alpha", "[0, 1)"], id="alpha-negative"),
    pytest.param(_set("alpha", "nan"), ["alpha", "[0, 1)"], id="alpha-nan"),
    pytest.param(_set("teacher_top1", "1.5"), ["teacher_top1", "[0, 1]"], id="top1-too-big"),
    pytest.param(_set("teacher_top1", "-0.01"), ["teacher_top1", "[0, 1]"], id="top1-negative"),
    pytest.param(_set("teacher_top1", "high"), ["teacher_top1", "not a number"], id="top1-word"),
    pytest.param(_set("source", "guessed"), ["source", "guessed", "lspp"], id="source-unknown"),
    pytest.param(_set("created", "yesterday"), ["created", "ISO 8601"], id="created-bad"),
    pytest.param(_del_tensor("cmatrix"), ["tensor 'cmatrix' is missing"], id="no-cmatrix"),
    pytest.param(_del_tensor("logits"), ["tensor 'logits' is missing"], id="no-logits"),
    pytest.param(_tensor("cmatrix", lambda t: t.double()), ["'cmatrix'", "float64", "float32"], id="cmatrix-float64"),
    pytest.param(_tensor("logits", lambda t: t.half()), ["'logits'", "float16", "float32"], id="logits-float16"),
    pytest.param(_tensor("cmatrix", lambda t: t[:, :3].contiguous()), ["'cmatrix'", "shape (4, 3)", "(4, 4)"], id="cmatrix-shape"),
    pytest.param(_tensor("logits", lambda t: torch.zeros(4, 4)), ["'logits'", "shape (4, 4)", "(4, 3)"], id="logits-shape"),
    pytest.param(_tensor("cmatrix", _set_at(2, 1, float("nan"))), ["'cmatrix'", "non-finite", "'deer'"], id="cmatrix-nan"),
    pytest.param(_tensor("cmatrix", _set_at(0, 1, float("inf"))), ["'cmatrix'", "non-finite", "'cat'"], id="cmatrix-inf"),
    pytest.param(_tensor("logits", _set_at(3, 0, float("-inf"))), ["'logits'", "non-finite", "'frog'"], id="logits-inf"),
    pytest.param(_tensor("cmatrix", _negative_prob), ["negative probability", "'dog'", "'deer'"], id="negative-prob"),
    pytest.param(_tensor("cmatrix", _nonzero_diagonal), ["diagonal", "'deer'"], id="nonzero-diagonal"),
    pytest.param(_tensor("cmatrix", _bad_row_sum), ["row 'frog'", "sums to", "not 1"], id="row-sum"),
    pytest.param(_tensor("cmatrix", _swap_in_row), ["does not match the softmax of logits", "'cat'"], id="softmax-mismatch"),
]


@pytest.mark.parametrize("mutate, needles", INVALID_CASES)
def test_invalid_file_is_rejected(tmp_path: Path, mutate: Callable, needles: list[str]) -> None:
    tensors, meta = raw_parts(make_cm())
    mutate(tensors, meta)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CMatrixError) as exc:
        load_cmatrix(path)
    assert_one_line_kderror(exc, *needles, prefix=f"{path}: ")


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_required_key_is_rejected(tmp_path: Path, key: str) -> None:
    tensors, meta = raw_parts(make_cm())
    del meta[key]
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CMatrixError) as exc:
        load_cmatrix(path)
    assert_one_line_kderror(exc, f"missing metadata key '{key}'", prefix=f"{path}: ")


def test_file_without_metadata_is_rejected(tmp_path: Path) -> None:
    tensors, _ = raw_parts(make_cm())
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CMatrixError) as exc:
        load_cmatrix(path)
    assert_one_line_kderror(exc, "no metadata", prefix=f"{path}: ")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CMatrixError) as exc:
        load_cmatrix(missing)
    assert_one_line_kderror(exc, "file not found", prefix=f"{missing}: ")
    with pytest.raises(CMatrixError) as exc:
        load_cmatrix(tmp_path)
    assert_one_line_kderror(exc, "is a directory", prefix=f"{tmp_path}: ")


def _garbage_files(tmp_path: Path) -> list[Path]:
    good = tmp_path / "good.safetensors"
    save_cmatrix(good, make_cm())
    data = good.read_bytes()
    files = []
    header_len = int.from_bytes(data[:8], "little")
    for cut in (0, 4, 8, 8 + header_len // 2, 8 + header_len, len(data) - 1):
        f = tmp_path / f"truncated-{cut}.safetensors"
        f.write_bytes(data[:cut])
        files.append(f)
    f = tmp_path / "random.safetensors"
    f.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    files.append(f)
    f = tmp_path / "text.safetensors"
    f.write_text("this is a text file, not a tensor file\n" * 20)
    files.append(f)
    f = tmp_path / "header-garbage.safetensors"
    f.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 16)
    files.append(f)
    return files


def test_corrupt_files_are_rejected(tmp_path: Path) -> None:
    files = _garbage_files(tmp_path)
    assert len(files) == 9
    for path in files:
        with pytest.raises(CMatrixError) as exc:
            load_cmatrix(path)
        assert_one_line_kderror(exc, "not a valid safetensors file (truncated or corrupt?)", prefix=f"{path}: ")


def test_pickle_files_are_rejected_and_never_unpickled(tmp_path: Path) -> None:
    # The trap works: unpickling really would create its marker.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(PickleTrap(control)))
    assert control.exists()

    marker = tmp_path / "marker"
    payload = {"cmatrix": PickleTrap(marker), "logits": torch.zeros(4, 3)}
    plain = tmp_path / "plain-pickle.safetensors"
    plain.write_bytes(pickle.dumps(payload))
    zipped = tmp_path / "torch-save.safetensors"
    torch.save(payload, zipped)
    assert not marker.exists()
    for path in (plain, zipped):
        with pytest.raises(CMatrixError) as exc:
            load_cmatrix(path)
        assert_one_line_kderror(exc, "not a valid safetensors file", prefix=f"{path}: ")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# In-memory validation


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"teacher_top1": 1.2}, "teacher_top1"),
        ({"source": "magic"}, "source"),
        ({"class_names": ("a", "b", "b", "c")}, "more than once"),
        ({"class_names": ("a", "b", "c")}, "shape"),
        ({"created": "not a date"}, "created"),
        ({"extra": {"format": "x"}}, "collides"),
        ({"extra": {"key": 3}}, "strings"),
    ],
)
def test_validate_in_memory(changes: dict, needle: str) -> None:
    from dataclasses import replace

    cm = replace(make_cm(), **changes)
    with pytest.raises(CMatrixError) as exc:
        validate(cm)
    msg = assert_one_line_kderror(exc, needle)
    assert msg.startswith("C-matrix: ")


def test_from_logits_rejects_bad_shape() -> None:
    with pytest.raises(CMatrixError):
        CMatrix.from_logits(torch.zeros(4, 4), NAMES, alpha=0.1)
    with pytest.raises(CMatrixError):
        CMatrix.from_probs(torch.zeros(4, 3), NAMES, alpha=0.1)


# ---------------------------------------------------------------------------------------------
# Atomic save


def test_failed_save_leaves_existing_file_and_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "cmatrix.safetensors"
    save_cmatrix(path, make_cm(seed=0))
    before = path.read_bytes()

    bad_probs = make_cm(seed=1).probs.clone()
    bad_probs[0, 1] = float("nan")
    invalid = CMatrix(probs=bad_probs, logits=make_cm(seed=1).logits, class_names=NAMES, alpha=0.1, source="lspp")
    with pytest.raises(CMatrixError) as exc:
        save_cmatrix(path, invalid)
    assert_one_line_kderror(exc, "non-finite", prefix=f"{path}: ")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cmatrix.safetensors"]


def test_save_failing_mid_write_leaves_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kd.io

    path = tmp_path / "cmatrix.safetensors"
    save_cmatrix(path, make_cm(seed=0))
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kd.io, "save_file", broken_save_file)
    with pytest.raises(CMatrixError) as exc:
        save_cmatrix(path, make_cm(seed=1))
    assert_one_line_kderror(exc, "cannot write", "No space left", prefix=f"{path}: ")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cmatrix.safetensors"]


def test_successful_overwrite_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "cmatrix.safetensors"
    save_cmatrix(path, make_cm(seed=0))
    second = make_cm(seed=1)
    save_cmatrix(path, second)
    assert torch.equal(load_cmatrix(path).probs, second.probs)
    assert sorted(os.listdir(tmp_path)) == ["cmatrix.safetensors"]


def test_save_into_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "c.safetensors"
    with pytest.raises(CMatrixError) as exc:
        save_cmatrix(path, make_cm())
    assert_one_line_kderror(exc, "cannot write", prefix=f"{path}: ")


# ---------------------------------------------------------------------------------------------
# Class names against a dataset, remapping


def test_check_class_names_count_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_cmatrix(path, make_cm())
    with pytest.raises(CMatrixError) as exc:
        load_cmatrix(path, expected_class_names=["cat", "dog", "deer"])
    assert_one_line_kderror(exc, "has 4 classes", "dataset has 3", prefix=f"{path}: ")


def test_check_class_names_order_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_cmatrix(path, make_cm())
    with pytest.raises(CMatrixError) as exc:
        load_cmatrix(path, expected_class_names=["dog", "cat", "deer", "frog"])
    assert_one_line_kderror(exc, "different order", "--remap-by-name", prefix=f"{path}: ")


def test_check_class_names_different_names() -> None:
    cm = make_cm()
    with pytest.raises(CMatrixError) as exc:
        check_class_names(cm, ["cat", "dog", "horse", "ship"], "somewhere")
    msg = assert_one_line_kderror(exc, "only in the C-matrix: 'deer', 'frog'", "only in the dataset: 'horse', 'ship'")
    assert msg.startswith("somewhere: ")

    big = make_cm(k=8)
    others = [f"other{i}" for i in range(8)]
    with pytest.raises(CMatrixError) as exc:
        check_class_names(big, others, "x")
    msg = assert_one_line_kderror(exc, "'class4'", "'other4'", "(+3 more)")
    assert "'class5'" not in msg and "'other5'" not in msg


def test_check_class_names_exact_match_passes() -> None:
    check_class_names(make_cm(), list(NAMES), "x")
    check_class_names(make_cm(), NAMES, "x")


def test_remap_by_name_permutes_rows_and_columns_consistently(tmp_path: Path) -> None:
    cm = make_cm(k=6, seed=5)
    old = list(cm.class_names)
    order = ["class3", "class0", "class5", "class1", "class4", "class2"]
    remapped = remap_by_name(cm, order)
    assert remapped.class_names == tuple(order)
    assert remapped.source == "remap"
    assert remapped.extra["parent_source"] == "lspp"
    assert remapped.alpha == cm.alpha and remapped.dataset == cm.dataset
    perm = [old.index(n) for n in order]
    old_full_logits = insert_diagonal(cm.logits, 0.0)
    new_full_logits = insert_diagonal(remapped.logits, 0.0)
    for a in range(6):
        for b in range(6):
            assert remapped.probs[a, b] == cm.probs[perm[a], perm[b]]
            if a != b:
                assert new_full_logits[a, b] == old_full_logits[perm[a], perm[b]]
    validate(remapped)
    path = tmp_path / "remapped.safetensors"
    save_cmatrix(path, remapped)
    loaded = load_cmatrix(path, expected_class_names=order)
    back = remap_by_name(loaded, old)
    assert torch.equal(back.probs, cm.probs)
    assert torch.equal(back.logits, cm.logits)


def test_remap_by_name_requires_the_same_names() -> None:
    cm = make_cm()
    with pytest.raises(CMatrixError) as exc:
        remap_by_name(cm, ["cat", "dog", "deer", "horse"])
    assert_one_line_kderror(exc, "horse")
    with pytest.raises(CMatrixError) as exc:
        remap_by_name(cm, ["cat", "dog", "deer"])
    assert_one_line_kderror(exc, "4 classes")


# ---------------------------------------------------------------------------------------------
# Showing


def _known_cm() -> CMatrix:
    probs = torch.tensor(
        [
            [0.0, 0.6, 0.3, 0.1],
            [0.5, 0.0, 0.2, 0.3],
            [0.05, 0.15, 0.0, 0.8],
            [0.25, 0.25, 0.5, 0.0],
        ]
    )
    return CMatrix.from_probs(probs, NAMES, alpha=0.1, dataset="toy", teacher_model="tiny-net", teacher_top1=0.75)


def test_top_neighbours() -> None:
    result = top_neighbours(_known_cm(), top=2)
    assert [name for name, _ in result] == list(NAMES)
    assert [n for n, _ in result[0][1]] == ["dog", "deer"]
    assert [n for n, _ in result[1][1]] == ["cat", "frog"]
    assert [n for n, _ in result[2][1]] == ["frog", "dog"]
    assert [n for n, _ in result[3][1]] == ["deer", "cat"]  # tie cat/dog 0.25: first by index
    assert result[2][1][0][1] == pytest.approx(0.8)
    full = top_neighbours(_known_cm(), top=10)
    assert all(len(neigh) == 3 for _, neigh in full)
    for name, neigh in full:
        assert name not in [n for n, _ in neigh]
        values = [p for _, p in neigh]
        assert values == sorted(values, reverse=True)


def test_format_show() -> None:
    text = format_show(_known_cm(), top=3)
    lines = text.splitlines()
    assert len(lines) == 1 + 4
    header = lines[0]
    for needle in ("K=4", "posthoc", "toy", "tiny-net", "0.1"):
        assert needle in header
    expected_top = {"cat": "dog 0.600", "dog": "cat 0.500", "deer": "frog 0.800", "frog": "deer 0.500"}
    for line, name in zip(lines[1:], NAMES):
        assert line.split()[0] == name
        head, _, tail = line.partition("->")
        assert tail.strip().startswith(expected_top[name]), line
    assert lines[1].startswith("cat  -> dog 0.600, deer 0.300, frog 0.100")
