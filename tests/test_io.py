"""Atomic writes: a failure mid-write never leaves a partial file under the final name."""

import os
import stat

import pytest
import torch

from kd.io import atomic_path, current_umask, save_safetensors_atomic, write_json_atomic, write_text_atomic


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"old": 1})
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_successful_write_replaces_file(tmp_path):
    target = tmp_path / "config.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert target.read_text().strip().endswith("}")
    assert '"a": 2' in target.read_text()


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore the previous one after it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    write_text_atomic(tmp_path / "notes.txt", "hello\n")
    save_safetensors_atomic(tmp_path / "cmatrix.safetensors", {"c": torch.eye(2)})
    for name in ("metrics.json", "notes.txt", "cmatrix.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_umask_fallback_without_proc_restores_the_mask(umask, monkeypatch):
    umask(0o027)
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert current_umask() == 0o027
    assert current_umask() == 0o027  # the fallback put the mask back
