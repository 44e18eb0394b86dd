"""Output files of the `kd` commands: checked before anything is computed, so a mistake costs nothing."""

from __future__ import annotations

from pathlib import Path

from kd.errors import KDError


def check_out_file(out: str, overwrite: bool, example: str = "cmatrix.safetensors", flag: str = "--out") -> Path:
    """The file to write (given as `flag`): refused if it is a directory, exists without `overwrite`, or its
    folder is missing."""
    path = Path(out)
    if path.is_dir():
        raise KDError(f"{flag} {out} is a directory; give a file name, e.g. {path / example}")
    if path.exists() and not overwrite:
        raise KDError(f"{flag} {out} already exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise KDError(f"{flag} {out}: directory {parent} does not exist")
    return path


def check_png_name(out: str, what: str = "the figure", flag: str = "--out") -> None:
    """A one-line KDError unless `out` (given as `flag`) ends in .png."""
    if Path(out).suffix.lower() != ".png":
        raise KDError(f"{flag} {out}: {what} is a PNG; give a file name ending in .png")
