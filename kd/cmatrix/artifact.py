"""The shareable C-matrix artifact, `cmatrix.safetensors` (format "lspp-cmatrix", version 1.0).

A C-matrix travels on its own between people, so everything in it is checked on load and
every problem is a one-line `CMatrixError` that starts with the file's path. Loading never
executes code: only the safetensors reader is used, never pickle or `torch.load`.
The format is specified in docs/cmatrix-format.md.

This module is the artifact itself (format, metadata, validation, load/save, class-name
checks, and re-ordering by class name: `reorder`, `remap_by_name`); the operations that derive
new matrices with their provenance (subset, merge, remap) are in `kd.cmatrix.ops`, the
comparison of two matrices (diff) in `kd.cmatrix.diff`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open

from kd import __version__
from kd.errors import KDError, short_list
from kd.io import WriteError, save_safetensors_atomic
from kd.losses.functional import cmatrix_from_logits, insert_diagonal, remove_diagonal

FORMAT_NAME = "lspp-cmatrix"
FORMAT_VERSION = "1.0"
SOURCES = ("lspp", "ols", "posthoc", "subset", "merge", "remap")

READABLE_MAJOR = 1
REQUIRED_KEYS = (
    "format",
    "format_version",
    "num_classes",
    "class_names",
    "alpha",
    "dataset",
    "teacher_model",
    "teacher_top1",
    "source",
    "toolkit_version",
    "created",
)
TENSOR_PROBS = "cmatrix"
TENSOR_LOGITS = "logits"

# Post-hoc logits are log(p) with p clamped here, so a zero probability gets a finite logit.
LOG_FLOOR = math.log(1e-12)
DIAGONAL_TOL = 1e-6
ROW_SUM_TOL = 1e-4
SOFTMAX_TOL = 1e-4


class CMatrixError(KDError):
    """A bad C-matrix (file); the one-line message starts with the file path when there is one."""


def _now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def quoted(text: str, limit: int = 80) -> str:
    """A value quoted for a message: escaped (never spans lines) and cut to `limit` characters."""
    quoted_text = repr(text)
    return quoted_text if len(quoted_text) <= limit else quoted_text[: limit - 4] + "...'"


def quoted_names(names: Sequence[str], limit: int = 5) -> str:
    """The first `limit` names, quoted and comma-separated, with a count of the rest; "(none)" if empty."""
    if not names:
        return "(none)"
    return short_list([quoted(n, 40) for n in names], limit)


def _fail(where: str, problem: str) -> CMatrixError:
    message = f"{where}: {problem}"
    return CMatrixError(" ".join(message.splitlines()))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_created(text: str) -> datetime | None:
    # Python 3.10's fromisoformat does not take a trailing "Z".
    candidate = text[:-1] + "+00:00" if text.endswith("Z") else text
    try:
        return datetime.fromisoformat(candidate)
    except ValueError:
        return None


@dataclass(frozen=True, eq=False)
class CMatrix:
    """A K x K class-similarity matrix with its K x (K-1) LS++ logits and provenance.

    Construction does not validate (see `validate`); `save_cmatrix` and `load_cmatrix` do.
    """

    probs: torch.Tensor
    logits: torch.Tensor
    class_names: tuple[str, ...]
    alpha: float
    source: str
    dataset: str = ""
    teacher_model: str = ""
    teacher_top1: float | None = None
    toolkit_version: str = __version__
    created: str = field(default_factory=_now_utc)
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.class_names, (str, tuple)):
            object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata (string to string): the required keys, then `extra`."""
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_classes": str(self.num_classes),
            "class_names": json.dumps(list(self.class_names), ensure_ascii=False),
            "alpha": repr(float(self.alpha)),
            "dataset": self.dataset,
            "teacher_model": self.teacher_model,
            "teacher_top1": "" if self.teacher_top1 is None else repr(float(self.teacher_top1)),
            "source": self.source,
            "toolkit_version": self.toolkit_version,
            "created": self.created,
        }
        for key, value in self.extra.items():
            meta.setdefault(key, value)
        return meta

    @classmethod
    def from_logits(
        cls,
        logits: torch.Tensor,
        class_names: Sequence[str],
        alpha: float,
        source: str = "lspp",
        **kw: Any,
    ) -> CMatrix:
        """From LS++ logits (K x (K-1)); probs = row softmax with a zero diagonal."""
        logits = logits.detach().to("cpu", torch.float32).contiguous().clone()
        if logits.dim() != 2 or logits.shape[1] != logits.shape[0] - 1:
            raise CMatrixError(f"C-matrix: logits must be K x (K-1), got shape {tuple(logits.shape)}")
        probs = cmatrix_from_logits(logits).contiguous()
        return cls(probs=probs, logits=logits, class_names=tuple(class_names), alpha=alpha, source=source, **kw)

    @classmethod
    def from_probs(
        cls,
        probs: torch.Tensor,
        class_names: Sequence[str],
        alpha: float,
        source: str = "posthoc",
        **kw: Any,
    ) -> CMatrix:
        """From a K x K probability matrix; logits = log of the off-diagonal probs, floored at log(1e-12)."""
        probs = probs.detach().to("cpu", torch.float32).contiguous().clone()
        if probs.dim() != 2 or probs.shape[0] != probs.shape[1]:
            raise CMatrixError(f"C-matrix: probs must be K x K, got shape {tuple(probs.shape)}")
        off = remove_diagonal(probs.double())
        logits = off.clamp_min(math.exp(LOG_FLOOR)).log().clamp_min(LOG_FLOOR).float().contiguous()
        return cls(probs=probs, logits=logits, class_names=tuple(class_names), alpha=alpha, source=source, **kw)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_class_names_value(names: Any, where: str) -> None:
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise _fail(where, "class_names must be a list of strings")
    if len(names) < 2:
        raise _fail(where, f"a C-matrix needs at least 2 classes, got {len(names)}")
    for i, name in enumerate(names):
        if not name:
            raise _fail(where, f"class_names[{i}] is an empty string")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise _fail(where, f"class name {quoted(name)} appears more than once in class_names")
        seen.add(name)


def _check_tensor_meta(tensor: Any, name: str, shape: tuple[int, ...], where: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise _fail(where, f"tensor '{name}' is missing")
    if tensor.dtype != torch.float32:
        raise _fail(where, f"tensor '{name}' has dtype {str(tensor.dtype).replace('torch.', '')}, expected float32")
    if tuple(tensor.shape) != shape:
        raise _fail(where, f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {shape} for K={shape[0]}")


def _check_values(probs: torch.Tensor, logits: torch.Tensor, names: Sequence[str], where: str) -> None:
    """Numeric checks on tensors whose dtype and shape are already right."""
    probs = probs.detach().cpu()
    logits = logits.detach().cpu()
    for tensor, label in ((probs, "cmatrix"), (logits, "logits")):
        bad_rows = (~torch.isfinite(tensor)).any(dim=1).nonzero().flatten()
        if bad_rows.numel():
            row = int(bad_rows[0])
            raise _fail(where, f"tensor '{label}' has non-finite values (NaN or inf) in row {quoted(names[row])}")
    negative = (probs < 0).nonzero()
    if negative.numel():
        i, j = (int(v) for v in negative[0])
        raise _fail(
            where,
            f"cmatrix has a negative probability {float(probs[i, j]):.6g} "
            f"at row {quoted(names[i])}, column {quoted(names[j])}",
        )
    diagonal = probs.diagonal().abs()
    off_zero = (diagonal > DIAGONAL_TOL).nonzero().flatten()
    if off_zero.numel():
        i = int(off_zero[0])
        raise _fail(
            where,
            f"cmatrix diagonal must be zero, but C[{quoted(names[i])}, {quoted(names[i])}] = "
            f"{float(probs[i, i]):.6g}",
        )
    row_sums = probs.double().sum(dim=1)
    bad_sum = ((row_sums - 1.0).abs() > ROW_SUM_TOL).nonzero().flatten()
    if bad_sum.numel():
        i = int(bad_sum[0])
        raise _fail(
            where,
            f"cmatrix row {quoted(names[i])} sums to {float(row_sums[i]):.6g}, not 1 (tolerance {ROW_SUM_TOL:g})",
        )
    expected = cmatrix_from_logits(logits.double())
    diff = (expected - probs.double()).abs()
    worst = float(diff.max())
    if worst > SOFTMAX_TOL:
        i = int(diff.max(dim=1).values.argmax())
        raise _fail(
            where,
            f"cmatrix does not match the softmax of logits (max abs difference {worst:.3g} in row "
            f"{quoted(names[i])}; tolerance {SOFTMAX_TOL:g})",
        )


def validate(cm: CMatrix, where: str = "C-matrix") -> None:
    """Check everything about `cm`; raise `CMatrixError` naming the first problem."""
    _check_class_names_value(cm.class_names, where)
    if not _is_real(cm.alpha) or not 0.0 <= float(cm.alpha) < 1.0:
        raise _fail(where, f"alpha must be a number in [0, 1), got {cm.alpha!r}")
    if cm.teacher_top1 is not None and (not _is_real(cm.teacher_top1) or not 0.0 <= float(cm.teacher_top1) <= 1.0):
        raise _fail(where, f"teacher_top1 must be a number in [0, 1] or unknown, got {cm.teacher_top1!r}")
    if cm.source not in SOURCES:
        raise _fail(where, f"source {quoted(str(cm.source))} is not one of {', '.join(SOURCES)}")
    for key in ("dataset", "teacher_model", "toolkit_version", "created"):
        if not isinstance(getattr(cm, key), str):
            raise _fail(where, f"{key} must be a string, got {type(getattr(cm, key)).__name__}")
    if _parse_created(cm.created) is None:
        raise _fail(where, f"created {quoted(cm.created)} is not an ISO 8601 timestamp")
    for key, value in cm.extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise _fail(where, f"extra metadata must map strings to strings (key {key!r})")
        if key in REQUIRED_KEYS:
            raise _fail(where, f"extra metadata key '{key}' collides with a reserved key")
    k = cm.num_classes
    _check_tensor_meta(cm.probs, TENSOR_PROBS, (k, k), where)
    _check_tensor_meta(cm.logits, TENSOR_LOGITS, (k, k - 1), where)
    _check_values(cm.probs, cm.logits, cm.class_names, where)


def check_class_names(cm: CMatrix, class_names: Sequence[str], where: str) -> None:
    """Check the C-matrix's classes against a dataset's; a mismatch raises a one-line `CMatrixError`."""
    file_names = list(cm.class_names)
    data_names = list(class_names)
    if file_names == data_names:
        return
    if len(file_names) != len(data_names):
        raise _fail(
            where,
            f"the C-matrix has {len(file_names)} classes but the dataset has {len(data_names)}; "
            "use a C-matrix made for this dataset",
        )
    if set(file_names) == set(data_names):
        i = next(n for n, (a, b) in enumerate(zip(file_names, data_names)) if a != b)
        raise _fail(
            where,
            f"same {len(file_names)} class names as the dataset but in a different order (first at index {i}: "
            f"file {quoted(file_names[i])}, dataset {quoted(data_names[i])}); rows and columns can be "
            "re-ordered by class name with --remap-by-name",
        )

    data_set, file_set = set(data_names), set(file_names)
    only_file = [n for n in file_names if n not in data_set]
    only_data = list(dict.fromkeys(n for n in data_names if n not in file_set))
    raise _fail(
        where,
        f"class names differ from the dataset's: only in the C-matrix: {quoted_names(only_file)}; "
        f"only in the dataset: {quoted_names(only_data)}",
    )


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_cmatrix(path: str | os.PathLike, cm: CMatrix) -> None:
    """Validate `cm`, then write it atomically (an existing file is replaced only on success)."""
    where = str(path)
    validate(cm, where)
    tensors = {TENSOR_PROBS: cm.probs, TENSOR_LOGITS: cm.logits}
    try:
        save_safetensors_atomic(path, tensors, cm.metadata())
    except OSError as exc:
        raise _fail(where, f"cannot write the C-matrix: {exc.strerror or exc}") from exc
    except WriteError as exc:
        raise _fail(where, f"cannot write the C-matrix: {exc.reason}") from None


def _parse_version(text: str, where: str) -> tuple[int, int]:
    match = re.fullmatch(r"([0-9]+)\.([0-9]+)", text)
    if match is None:
        raise _fail(where, f"format_version {quoted(text)} is malformed (expected MAJOR.MINOR, e.g. {FORMAT_VERSION})")
    major, minor = int(match.group(1)), int(match.group(2))
    if major > READABLE_MAJOR:
        raise _fail(
            where,
            f"written by format version {text}; this toolkit reads {READABLE_MAJOR}.x — upgrade lspp-kd",
        )
    if major < READABLE_MAJOR:
        raise _fail(where, f"written by format version {text}; this toolkit reads only {READABLE_MAJOR}.x")
    return major, minor


def _parse_float(meta: Mapping[str, str], key: str, where: str) -> float:
    try:
        return float(meta[key])
    except ValueError:
        raise _fail(where, f"{key} {quoted(meta[key])} is not a number") from None


def _parse_metadata(meta: Mapping[str, str] | None, where: str) -> dict[str, Any]:
    if not meta:
        raise _fail(where, f"no metadata in the file (not an {FORMAT_NAME} file?)")
    if "format" not in meta:
        raise _fail(where, f"missing metadata key 'format' (not an {FORMAT_NAME} file?)")
    if meta["format"] != FORMAT_NAME:
        raise _fail(where, f"format is {quoted(meta['format'])}, expected '{FORMAT_NAME}'")
    if "format_version" not in meta:
        raise _fail(where, "missing metadata key 'format_version'")
    _parse_version(meta["format_version"], where)
    for key in REQUIRED_KEYS:
        if key not in meta:
            raise _fail(where, f"missing metadata key '{key}'")

    if re.fullmatch(r"[0-9]+", meta["num_classes"]) is None:
        raise _fail(where, f"num_classes {quoted(meta['num_classes'])} is not an integer")
    k = int(meta["num_classes"])
    if k < 2:
        raise _fail(where, f"num_classes must be at least 2, got {k}")
    try:
        names = json.loads(meta["class_names"])
    except ValueError:
        raise _fail(where, "class_names is not valid JSON (expected a JSON list of strings)") from None
    _check_class_names_value(names, where)
    if len(names) != k:
        raise _fail(where, f"class_names lists {len(names)} names but num_classes is {k}")

    alpha = _parse_float(meta, "alpha", where)
    if not 0.0 <= alpha < 1.0:
        raise _fail(where, f"alpha must be in [0, 1), got {quoted(meta['alpha'])}")
    teacher_top1: float | None = None
    if meta["teacher_top1"] != "":
        teacher_top1 = _parse_float(meta, "teacher_top1", where)
        if not 0.0 <= teacher_top1 <= 1.0:
            raise _fail(where, f"teacher_top1 must be in [0, 1] or empty, got {quoted(meta['teacher_top1'])}")
    if meta["source"] not in SOURCES:
        raise _fail(where, f"source {quoted(meta['source'])} is not one of {', '.join(SOURCES)}")
    if _parse_created(meta["created"]) is None:
        raise _fail(where, f"created {quoted(meta['created'])} is not an ISO 8601 timestamp")
    return {
        "class_names": tuple(names),
        "alpha": alpha,
        "source": meta["source"],
        "dataset": meta["dataset"],
        "teacher_model": meta["teacher_model"],
        "teacher_top1": teacher_top1,
        "toolkit_version": meta["toolkit_version"],
        "created": meta["created"],
        "extra": {key: value for key, value in meta.items() if key not in REQUIRED_KEYS},
    }


_DTYPE_NAMES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}


def load_cmatrix(path: str | os.PathLike, expected_class_names: Sequence[str] | None = None) -> CMatrix:
    """Read and fully check a `cmatrix.safetensors` file (never executes code from it).

    With `expected_class_names` (a dataset's classes) the file's classes must match them exactly.
    """
    where = str(path)
    file = Path(path)
    if not file.exists():
        raise _fail(where, "file not found")
    if file.is_dir():
        raise _fail(where, "is a directory, not a cmatrix.safetensors file")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            meta = reader.metadata()
            parsed = _parse_metadata(meta, where)
            k = len(parsed["class_names"])
            keys = set(reader.keys())
            tensors: dict[str, torch.Tensor] = {}
            for name, shape in ((TENSOR_PROBS, (k, k)), (TENSOR_LOGITS, (k, k - 1))):
                if name not in keys:
                    raise _fail(where, f"tensor '{name}' is missing")
                tensor_slice = reader.get_slice(name)
                dtype = str(tensor_slice.get_dtype())
                if dtype != "F32":
                    raise _fail(where, f"tensor '{name}' has dtype {_DTYPE_NAMES.get(dtype, dtype)}, expected float32")
                got = tuple(tensor_slice.get_shape())
                if got != shape:
                    raise _fail(where, f"tensor '{name}' has shape {got}, expected {shape} for K={k}")
                tensors[name] = reader.get_tensor(name)
    except CMatrixError:
        raise
    except PermissionError as exc:
        raise _fail(where, f"cannot read the file: {exc.strerror or 'permission denied'}") from exc
    except Exception as exc:  # whatever safetensors raises on a bad file (SafetensorError), and OSError
        raise _fail(where, "not a valid safetensors file (truncated or corrupt?)") from exc

    cm = CMatrix(probs=tensors[TENSOR_PROBS], logits=tensors[TENSOR_LOGITS], **parsed)
    validate(cm, where)
    if expected_class_names is not None:
        check_class_names(cm, expected_class_names, where)
    return cm


# ---------------------------------------------------------------------------------------------
# Re-ordering by class name, file checksum


def select_logits(logits: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
    """The K' x (K'-1) logits of the classes at `index` (in that order), from K x (K-1) `logits`.

    The diagonal entry of row a lands on the diagonal of the new row a, so dropping it again
    leaves each row's off-diagonal logits in the new column order.
    """
    perm = torch.as_tensor(list(index), dtype=torch.long)
    full = insert_diagonal(logits, 0.0)
    return remove_diagonal(full[perm][:, perm].contiguous()).contiguous()


def reorder(cm: CMatrix, class_names: Sequence[str], where: str = "remap") -> CMatrix:
    """A new matrix (source "remap") with `cm`'s rows and columns (probs and logits alike) re-ordered to
    `class_names`, which must name each of its classes once; a one-line `CMatrixError` starting with
    `where` otherwise. The first remap records its parent's source and creation time."""
    target = tuple(class_names)
    if len(set(target)) != len(target):
        duplicates = sorted({n for n in target if target.count(n) > 1})
        raise _fail(where, f"class {quoted_names(duplicates)} appears more than once in the target order")
    have, want = set(cm.class_names), set(target)
    if have != want:
        missing = [n for n in target if n not in have]
        dropped = [n for n in cm.class_names if n not in want]
        hint = "; to keep only some classes use `kd cmatrix subset`" if not missing else ""
        raise _fail(
            where,
            f"the target order must name the same {cm.num_classes} classes as the C-matrix: "
            f"only in the C-matrix: {quoted_names(dropped)}; only in the target: {quoted_names(missing)}{hint}",
        )
    index = {name: i for i, name in enumerate(cm.class_names)}
    perm = [index[name] for name in target]
    probs = cm.probs[perm][:, perm].contiguous()
    extra = dict(cm.extra)
    if cm.source != "remap":
        extra["parent_source"] = cm.source
        extra["parent_created"] = cm.created
    return replace(
        cm, probs=probs, logits=select_logits(cm.logits, perm), class_names=target, source="remap",
        created=_now_utc(), extra=extra,
    )


def remap_by_name(cm: CMatrix, class_names: Sequence[str]) -> CMatrix:
    """`reorder` to `class_names`, the same set of names; `cm` itself when it is in that order already."""
    target = tuple(class_names)
    return cm if target == cm.class_names else reorder(cm, target, "remap by name")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (what people publish next to a shared C-matrix)."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                digest.update(block)
    except OSError as exc:
        raise _fail(str(path), f"cannot read the file: {exc.strerror or exc}") from exc
    return digest.hexdigest()


# A row whose normalised entropy is below this has (nearly) all its mass on one class.
PEAKED_ENTROPY = 0.05


def normalised_row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Each row's entropy over the K-1 non-target classes divided by log(K-1): 1 = uniform, 0 = one class."""
    k = probs.shape[0]
    p = probs.double()
    entropy = -(torch.where(p > 0, p * p.clamp(min=1e-300).log(), torch.zeros_like(p))).sum(dim=1)
    return (entropy / math.log(k - 1)).float() if k > 2 else torch.zeros(k)


def peaked_rows(cm: CMatrix) -> list[str]:
    """Class names whose row puts (nearly) all its mass on one other class (legitimate, but worth a look)."""
    if cm.num_classes <= 2:
        return []
    low = normalised_row_entropy(cm.probs) < PEAKED_ENTROPY
    return [name for name, peaked in zip(cm.class_names, low.tolist()) if peaked]
