"""A cache of decoded ImageFolder splits, so a repeated run starts training in seconds.

Decoding 60,000 CIFAR-10 JPEGs takes most of a minute on two cores; reading the decoded
uint8 tensor back (184 MB) takes well under a second. A split is cached only when every file
decoded, under a key made from each file's absolute path, size and modification time plus the
decoded geometry (channels, side), so any change to the files, or another --image-size, misses
the cache instead of reading stale pixels.

Where: `$KD_CACHE_DIR`, else `$XDG_CACHE_HOME/lspp-kd`, else `~/.cache/lspp-kd` (a data
directory may be read-only or shared, so the cache never goes there). `KD_CACHE_DIR=off`
turns it off. A cache that cannot be written or read is skipped with one line on stderr; it
never stops a run.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from kd.errors import KDError
from kd.io import save_safetensors_atomic

CACHE_ENV = "KD_CACHE_DIR"
_OFF = ("off", "0", "none", "no", "false")
_FORMAT = "kd-decoded/1"


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured.lower() in _OFF:
        return None
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lspp-kd"


def cache_key(files: Sequence[str], channels: int, size: int) -> str | None:
    """A key for these files decoded to channels x size x size; None if a file cannot be stat'ed."""
    digest = hashlib.sha256(f"{_FORMAT}\n{channels}\n{size}\n".encode())
    try:
        for path in files:
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return digest.hexdigest()[:32]


def _path(key: str) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / f"decoded-{key}.safetensors"


def load_decoded(key: str | None, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """The cached uint8 images for `key` if present and of `shape`; else None."""
    path = _path(key) if key else None
    if path is None or not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        images = load_file(str(path))["images"]
    except (OSError, KeyError, SafetensorError) as error:
        print(f"kd: warning: ignoring the unreadable data cache {path} ({error})", file=sys.stderr, flush=True)
        return None
    if images.dtype != torch.uint8 or tuple(images.shape) != shape:
        return None
    return images


def store_decoded(key: str | None, images: torch.Tensor) -> None:
    """Cache decoded images under `key`; a failure to write is one warning line, not an error."""
    path = _path(key) if key else None
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(path, {"images": images}, metadata={"format": _FORMAT})
    except (OSError, KDError) as error:  # kd.io.WriteError: a folder that cannot be written
        print(f"kd: warning: cannot write the data cache {path} ({error}); set {CACHE_ENV}=off to stop trying",
              file=sys.stderr, flush=True)
