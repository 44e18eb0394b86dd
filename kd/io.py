"""Atomic file writing: a killed run never leaves a half-written file under the final name.

Files get the permissions a plain `open(path, "w")` would give them (0666 less the umask:
0644 under umask 022), not the 0600 of the temporary file `tempfile.mkstemp` creates.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from kd.errors import KDError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(mask)
    return mask


class WriteError(KDError):
    """A file that cannot be created (missing or read-only folder); `reason` is the system's words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.reason = reason


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes free to this user under `folder` (None if the filesystem cannot say)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def failed_write(what: str, folder: str | os.PathLike, error: BaseException) -> KDError | None:
    """The one-line error for a write that `error` stopped, or None if `error` is no failed write.

    An OSError is one (no space left, a quota, a read-only filesystem, ...). The serializers
    report theirs otherwise: torch's as a RuntimeError ("unexpected pos", "PytorchStreamWriter
    failed"), safetensors' as a SafetensorError ("I/O error: No space left on device"); those
    count when they say "No space left" or the filesystem has (nearly) no space left.
    """
    if isinstance(error, OSError):
        return WriteError(Path(folder), f"{error.strerror or error} (writing {what})")
    if not isinstance(error, Exception) or isinstance(error, KDError):
        return None
    free = free_bytes(folder)
    if "No space left" in str(error) or (free is not None and free < _NEARLY_FULL):
        left = f"; {free // 1024} KiB free" if free is not None else ""
        return WriteError(Path(folder), f"No space left on device (writing {what}{left})")
    return None


# Below this many free bytes a failed write is put down to a full disk.
_NEARLY_FULL = 1 << 20


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it is fsynced and renamed onto `final`.

    The file ends up with mode 0666 less the umask, like a file created in place. On any
    error the temporary file is removed and `final` is left as it was.
    """
    final = Path(final)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as error:
        raise WriteError(final, error.strerror or str(error)) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        failure = failed_write(final.name, final.parent, error)
        if failure is not None:
            raise failure from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def strict_json(data: Any) -> Any:
    """`data` with every non-finite float (NaN, +-Infinity, which strict JSON has no words for) as None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Strict JSON (no NaN or Infinity: they are written as null), atomically."""
    write_text_atomic(path, json.dumps(strict_json(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, written to a temporary name and renamed into place."""
    contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)
