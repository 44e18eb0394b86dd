"""The shareable C-matrix artifact, `cmatrix.safetensors` (format "lspp-cmatrix", version 1.0).

A C-matrix travels on its own between people, so everything in it is checked on load and
every problem is a one-line `CMatrixError` that starts with the file's path. Loading never
executes code: only the safetensors reader is used, never pickle or `torch.load`.
The format is specified in docs/cmatrix-format.md.
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
from kd.errors import KDError
from kd.io import save_safetensors_atomic
from kd.lspp import cmatrix_from_logits, insert_diagonal, remove_diagonal

FORMAT_NAME = "lspp-cmatrix"
FORMAT_VERSION = "1.0"
SOURCES = ("lspp", "posthoc", "subset", "merge", "remap")

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


def _one_line(text: str, limit: int = 80) -> str:
    """A value quoted for a message: escaped (never spans lines) and cut to `limit` characters."""
    quoted = repr(text)
    return quoted if len(quoted) <= limit else quoted[: limit - 4] + "...'"


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
            raise _fail(where, f"class name {_one_line(name)} appears more than once in class_names")
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
            raise _fail(where, f"tensor '{label}' has non-finite values (NaN or inf) in row {_one_line(names[row])}")
    negative = (probs < 0).nonzero()
    if negative.numel():
        i, j = (int(v) for v in negative[0])
        raise _fail(
            where,
            f"cmatrix has a negative probability {float(probs[i, j]):.6g} "
            f"at row {_one_line(names[i])}, column {_one_line(names[j])}",
        )
    diagonal = probs.diagonal().abs()
    off_zero = (diagonal > DIAGONAL_TOL).nonzero().flatten()
    if off_zero.numel():
        i = int(off_zero[0])
        raise _fail(
            where,
            f"cmatrix diagonal must be zero, but C[{_one_line(names[i])}, {_one_line(names[i])}] = "
            f"{float(probs[i, i]):.6g}",
        )
    row_sums = probs.double().sum(dim=1)
    bad_sum = ((row_sums - 1.0).abs() > ROW_SUM_TOL).nonzero().flatten()
    if bad_sum.numel():
        i = int(bad_sum[0])
        raise _fail(
            where,
            f"cmatrix row {_one_line(names[i])} sums to {float(row_sums[i]):.6g}, not 1 (tolerance {ROW_SUM_TOL:g})",
        )
    expected = cmatrix_from_logits(logits.double())
    diff = (expected - probs.double()).abs()
    worst = float(diff.max())
    if worst > SOFTMAX_TOL:
        i = int(diff.max(dim=1).values.argmax())
        raise _fail(
            where,
            f"cmatrix does not match the softmax of logits (max abs difference {worst:.3g} in row "
            f"{_one_line(names[i])}; tolerance {SOFTMAX_TOL:g})",
        )


def validate(cm: CMatrix, where: str = "C-matrix") -> None:
    """Check everything about `cm`; raise `CMatrixError` naming the first problem."""
    _check_class_names_value(cm.class_names, where)
    if not _is_real(cm.alpha) or not 0.0 <= float(cm.alpha) < 1.0:
        raise _fail(where, f"alpha must be a number in [0, 1), got {cm.alpha!r}")
    if cm.teacher_top1 is not None and (not _is_real(cm.teacher_top1) or not 0.0 <= float(cm.teacher_top1) <= 1.0):
        raise _fail(where, f"teacher_top1 must be a number in [0, 1] or unknown, got {cm.teacher_top1!r}")
    if cm.source not in SOURCES:
        raise _fail(where, f"source {_one_line(str(cm.source))} is not one of {', '.join(SOURCES)}")
    for key in ("dataset", "teacher_model", "toolkit_version", "created"):
        if not isinstance(getattr(cm, key), str):
            raise _fail(where, f"{key} must be a string, got {type(getattr(cm, key)).__name__}")
    if _parse_created(cm.created) is None:
        raise _fail(where, f"created {_one_line(cm.created)} is not an ISO 8601 timestamp")
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
            f"file {_one_line(file_names[i])}, dataset {_one_line(data_names[i])}); rows and columns can be "
            "re-ordered by class name with --remap-by-name",
        )

    def listing(names: list[str]) -> str:
        if not names:
            return "(none)"
        shown = ", ".join(_one_line(n, 40) for n in names[:5])
        return shown + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    data_set, file_set = set(data_names), set(file_names)
    only_file = [n for n in file_names if n not in data_set]
    only_data = list(dict.fromkeys(n for n in data_names if n not in file_set))
    raise _fail(
        where,
        f"class names differ from the dataset's: only in the C-matrix: {listing(only_file)}; "
        f"only in the dataset: {listing(only_data)}",
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


def _parse_version(text: str, where: str) -> tuple[int, int]:
    match = re.fullmatch(r"([0-9]+)\.([0-9]+)", text)
    if match is None:
        raise _fail(where, f"format_version {_one_line(text)} is malformed (expected MAJOR.MINOR, e.g. {FORMAT_VERSION})")
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
        raise _fail(where, f"{key} {_one_line(meta[key])} is not a number") from None


def _parse_metadata(meta: Mapping[str, str] | None, where: str) -> dict[str, Any]:
    if not meta:
        raise _fail(where, f"no metadata in the file (not an {FORMAT_NAME} file?)")
    if "format" not in meta:
        raise _fail(where, f"missing metadata key 'format' (not an {FORMAT_NAME} file?)")
    if meta["format"] != FORMAT_NAME:
        raise _fail(where, f"format is {_one_line(meta['format'])}, expected '{FORMAT_NAME}'")
    if "format_version" not in meta:
        raise _fail(where, "missing metadata key 'format_version'")
    _parse_version(meta["format_version"], where)
    for key in REQUIRED_KEYS:
        if key not in meta:
            raise _fail(where, f"missing metadata key '{key}'")

    if re.fullmatch(r"[0-9]+", meta["num_classes"]) is None:
        raise _fail(where, f"num_classes {_one_line(meta['num_classes'])} is not an integer")
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
        raise _fail(where, f"alpha must be in [0, 1), got {_one_line(meta['alpha'])}")
    teacher_top1: float | None = None
    if meta["teacher_top1"] != "":
        teacher_top1 = _parse_float(meta, "teacher_top1", where)
        if not 0.0 <= teacher_top1 <= 1.0:
            raise _fail(where, f"teacher_top1 must be in [0, 1] or empty, got {_one_line(meta['teacher_top1'])}")
    if meta["source"] not in SOURCES:
        raise _fail(where, f"source {_one_line(meta['source'])} is not one of {', '.join(SOURCES)}")
    if _parse_created(meta["created"]) is None:
        raise _fail(where, f"created {_one_line(meta['created'])} is not an ISO 8601 timestamp")
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
# Operations


def remap_by_name(cm: CMatrix, class_names: Sequence[str]) -> CMatrix:
    """Re-order rows and columns (probs and logits alike) to `class_names`, the same set of names."""
    target = tuple(class_names)
    if target == cm.class_names:
        return cm
    if len(target) != cm.num_classes or set(target) != set(cm.class_names) or len(set(target)) != len(target):
        check_class_names(cm, target, "remap by name")  # explains count or name differences
        raise _fail("remap by name", "class names must be the same set of unique names as the C-matrix's")
    index = {name: i for i, name in enumerate(cm.class_names)}
    perm = torch.tensor([index[name] for name in target], dtype=torch.long)
    probs = cm.probs[perm][:, perm].contiguous()
    # The diagonal entry of row a lands on the diagonal of the new row a, so dropping it again
    # leaves each row's off-diagonal logits in the new column order.
    full_logits = insert_diagonal(cm.logits, 0.0)
    logits = remove_diagonal(full_logits[perm][:, perm].contiguous()).contiguous()
    extra = dict(cm.extra)
    if cm.source != "remap":
        extra["parent_source"] = cm.source
        extra["parent_created"] = cm.created
    return replace(cm, probs=probs, logits=logits, class_names=target, source="remap", created=_now_utc(), extra=extra)


def top_neighbours(cm: CMatrix, top: int = 3) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each class, its `top` most similar other classes with their probabilities, descending."""
    if top < 1:
        raise CMatrixError(f"top must be at least 1, got {top}")
    k = cm.num_classes
    count = min(top, k - 1)
    off = remove_diagonal(cm.probs.detach().cpu().float())
    result: list[tuple[str, list[tuple[str, float]]]] = []
    for i, name in enumerate(cm.class_names):
        values, order = torch.sort(off[i], descending=True, stable=True)
        neighbours = []
        for value, j in zip(values[:count].tolist(), order[:count].tolist()):
            column = j if j < i else j + 1  # undo the removed diagonal
            neighbours.append((cm.class_names[column], float(value)))
        result.append((name, neighbours))
    return result


def format_show(cm: CMatrix, top: int = 3) -> str:
    """Human-readable summary for `kd cmatrix show`: a header line, then one line per class."""
    teacher = cm.teacher_model or "unknown"
    if cm.teacher_top1 is not None:
        teacher += f" (top-1 {cm.teacher_top1:.4f})"
    header = (
        f"C-matrix: K={cm.num_classes}  source={cm.source}  dataset={cm.dataset or 'unknown'}  "
        f"teacher={teacher}  alpha={float(cm.alpha):g}  created={cm.created}"
    )
    rows = top_neighbours(cm, top)
    width = max(len(name) for name, _ in rows)
    lines = [header]
    for name, neighbours in rows:
        listed = ", ".join(f"{other} {p:.3f}" for other, p in neighbours)
        lines.append(f"{name:<{width}} -> {listed}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Sharing tools: provenance, subset, merge, remap, diff (the `kd cmatrix` commands)

# Extra metadata keys written by the tools below (see docs/cmatrix-format.md, "Provenance").
PROVENANCE_KEYS = ("sources", "parent_source", "parent_created")
# `diff` needs at least this many shared classes: two non-target entries per row to compare.
MIN_DIFF_CLASSES = 3


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


def source_entry(cm: CMatrix, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """One input's provenance record for the `sources` metadata key.

    With `path` it names the file (base name only) and its SHA-256; the input's own `sources`
    (its lineage) are nested, so a chain of subset/merge/remap steps stays traceable.
    """
    entry: dict[str, Any] = {}
    if path is not None:
        entry["file"] = Path(path).name
        entry["sha256"] = file_sha256(path)
    entry.update(
        source=cm.source,
        dataset=cm.dataset,
        teacher_model=cm.teacher_model,
        teacher_top1=cm.teacher_top1,
        alpha=float(cm.alpha),
        num_classes=cm.num_classes,
        created=cm.created,
    )
    if "sources" in cm.extra:
        try:
            entry["sources"] = json.loads(cm.extra["sources"])
        except ValueError:
            entry["sources"] = cm.extra["sources"]
    return entry


def parse_sources(cm: CMatrix) -> list[Any] | None:
    """The `sources` provenance list of `cm`, or None if absent or not a JSON list."""
    text = cm.extra.get("sources")
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def _sources_json(sources: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([dict(s) for s in sources], ensure_ascii=False, separators=(",", ":"))


def _listing(names: Sequence[str], limit: int = 5) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(_one_line(n, 40) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _restrict_logits(cm: CMatrix, index: Sequence[int]) -> torch.Tensor:
    """The K' x (K'-1) logits of the classes at `index` (in that order), from `cm`'s logits."""
    perm = torch.tensor(list(index), dtype=torch.long)
    full = insert_diagonal(cm.logits.detach().cpu().float(), 0.0)
    return remove_diagonal(full[perm][:, perm].contiguous()).contiguous()


def subset(cm: CMatrix, class_names: Sequence[str], sources: Sequence[Mapping[str, Any]] | None = None) -> CMatrix:
    """Restrict `cm` to `class_names` (in that order) and renormalise each row over the kept classes.

    The kept logits are restricted and the probabilities re-derived from them (softmax with a
    zero diagonal), which is exactly the original rows renormalised over the kept non-target
    classes: the ratio of any two kept entries is unchanged. A row that put no mass on the kept
    classes (possible only for a post-hoc matrix with zeros) becomes uniform over them.
    `sources` is the provenance to record (default: a record of `cm` without file checksum).
    """
    target = tuple(class_names)
    if len(target) < 2:
        raise CMatrixError(f"subset: keep at least 2 classes, got {len(target)}")
    duplicates = sorted({n for n in target if target.count(n) > 1})
    if duplicates:
        raise CMatrixError(f"subset: class {_listing(duplicates)} named more than once")
    index = {name: i for i, name in enumerate(cm.class_names)}
    unknown = [n for n in target if n not in index]
    if unknown:
        raise CMatrixError(
            f"subset: no class {_listing(unknown)} in the C-matrix (its classes: {_listing(list(cm.class_names), 8)})"
        )
    logits = _restrict_logits(cm, [index[n] for n in target])
    extra = {k: v for k, v in cm.extra.items() if k not in PROVENANCE_KEYS}
    extra["sources"] = _sources_json(sources if sources is not None else [source_entry(cm)])
    return CMatrix.from_logits(
        logits,
        target,
        alpha=cm.alpha,
        source="subset",
        dataset=cm.dataset,
        teacher_model=cm.teacher_model,
        teacher_top1=cm.teacher_top1,
        extra=extra,
    )


def remap(cm: CMatrix, class_names: Sequence[str], sources: Sequence[Mapping[str, Any]] | None = None) -> CMatrix:
    """`remap_by_name` that always returns a new `source = "remap"` matrix with `sources` provenance.

    `class_names` must be the same set as `cm`'s; a strict subset is refused with a pointer to
    `subset`.
    """
    target = tuple(class_names)
    if len(set(target)) != len(target):
        duplicates = sorted({n for n in target if target.count(n) > 1})
        raise CMatrixError(f"remap: class {_listing(duplicates)} appears more than once in the target order")
    have, want = set(cm.class_names), set(target)
    if have != want:
        missing = [n for n in target if n not in have]
        dropped = [n for n in cm.class_names if n not in want]
        hint = "; to keep only some classes use `kd cmatrix subset`" if not missing else ""
        raise CMatrixError(
            f"remap: the target order must name the same {cm.num_classes} classes as the C-matrix: "
            f"only in the C-matrix: {_listing(dropped)}; only in the target: {_listing(missing)}{hint}"
        )
    out = remap_by_name(cm, target)
    extra = dict(out.extra)
    if out is cm and cm.source != "remap":  # already in order: record the parent as remap_by_name would
        extra["parent_source"] = cm.source
        extra["parent_created"] = cm.created
    extra["sources"] = _sources_json(sources if sources is not None else [source_entry(cm)])
    return replace(out, source="remap", created=_now_utc(), extra=extra)


def _joined(values: Sequence[str]) -> str:
    return "+".join(dict.fromkeys(v for v in values if v))


def merge(
    cms: Sequence[CMatrix],
    sources: Sequence[Mapping[str, Any]] | None = None,
    names: Sequence[str] | None = None,
) -> CMatrix:
    """Average several C-matrices over the same class names (an ensemble proxy teacher).

    Every matrix is aligned by name to the first one's class order; the result's rows are the
    plain mean of the probability rows (so still row-stochastic, zero diagonal), its logits the
    log of those means, and its alpha the mean of the alphas. `dataset` and `teacher_model`
    join the distinct inputs' values with "+"; `teacher_top1` is unknown (an ensemble has none).
    `names` labels the inputs in error messages (e.g. their paths).
    """
    if len(cms) < 2:
        raise CMatrixError(f"merge: needs at least 2 C-matrices, got {len(cms)}")
    labels = list(names) if names is not None else [f"C-matrix {i + 1}" for i in range(len(cms))]
    first = cms[0]
    order = first.class_names
    aligned = [first]
    for cm, label in zip(cms[1:], labels[1:]):
        if set(cm.class_names) != set(order):
            only_here = [n for n in cm.class_names if n not in set(order)]
            only_first = [n for n in order if n not in set(cm.class_names)]
            raise CMatrixError(
                f"merge: {label} has different class names from {labels[0]}: only in {label}: "
                f"{_listing(only_here)}; only in {labels[0]}: {_listing(only_first)}; "
                "merge needs the same classes (restrict with `kd cmatrix subset` first)"
            )
        aligned.append(remap_by_name(cm, order))
    probs = torch.stack([cm.probs.detach().cpu().double() for cm in aligned]).mean(dim=0)
    probs.fill_diagonal_(0.0)
    probs = probs / probs.sum(dim=1, keepdim=True)  # only float rounding to undo: each row sums to 1
    entries = sources if sources is not None else [source_entry(cm) for cm in cms]
    return CMatrix.from_probs(
        probs.float(),
        order,
        alpha=float(sum(float(cm.alpha) for cm in cms) / len(cms)),
        source="merge",
        dataset=_joined([cm.dataset for cm in cms]),
        teacher_model=_joined([cm.teacher_model for cm in cms]),
        teacher_top1=None,
        extra={"sources": _sources_json(entries)},
    )


@dataclass(frozen=True)
class ClassDiff:
    """How one class's row differs between two C-matrices (over their shared classes)."""

    name: str
    js_bits: float
    top1_a: str
    top1_b: str
    spearman: float | None  # None when a row is constant (ranks undefined)

    @property
    def agree(self) -> bool:
        return self.top1_a == self.top1_b


@dataclass(frozen=True)
class CMatrixDiff:
    """Per-class comparison of two C-matrices, restricted to their shared class names."""

    classes: tuple[ClassDiff, ...]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    alpha_a: float
    alpha_b: float

    @property
    def mean_js_bits(self) -> float:
        return float(sum(c.js_bits for c in self.classes) / len(self.classes))

    @property
    def max_js(self) -> ClassDiff:
        return max(self.classes, key=lambda c: c.js_bits)

    @property
    def top1_agreement(self) -> float:
        return sum(c.agree for c in self.classes) / len(self.classes)

    @property
    def mean_spearman(self) -> float | None:
        defined = [c.spearman for c in self.classes if c.spearman is not None]
        return float(sum(defined) / len(defined)) if defined else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "divergence": "Jensen-Shannon, bits (0 = same row, 1 = disjoint)",
            "classes": [
                {"class": c.name, "js_bits": c.js_bits, "top1_a": c.top1_a, "top1_b": c.top1_b,
                 "agree": c.agree, "spearman": c.spearman}
                for c in self.classes
            ],
            "summary": {
                "shared_classes": len(self.classes),
                "mean_js_bits": self.mean_js_bits,
                "max_js_bits": self.max_js.js_bits,
                "max_js_class": self.max_js.name,
                "top1_agreement": self.top1_agreement,
                "mean_spearman": self.mean_spearman,
                "only_in_a": list(self.only_in_a),
                "only_in_b": list(self.only_in_b),
                "alpha_a": self.alpha_a,
                "alpha_b": self.alpha_b,
            },
        }


def js_divergence_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence of two distributions in bits (base 2), in [0, 1]."""
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(x: torch.Tensor) -> float:
        keep = x > 0
        return float((x[keep] * (x[keep] / m[keep]).log2()).sum())

    return min(1.0, max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of `x`, ties given their average rank."""
    values, order = torch.sort(x.double(), stable=True)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() + 1) / 2  # mean of the 0-based ranks start..end-1
    ranks = torch.empty_like(values)
    ranks[order] = average.repeat_interleave(counts)
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman rank correlation (average ranks for ties); None if either input is constant."""
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.square().sum() * ry.square().sum()).sqrt())
    if denom == 0.0:
        return None
    return max(-1.0, min(1.0, float((rx * ry).sum()) / denom))


def _top1(row: torch.Tensor, i: int, names: Sequence[str]) -> str:
    j = int(torch.argmax(row))  # first maximum on ties
    return names[j if j < i else j + 1]


def diff(a: CMatrix, b: CMatrix) -> CMatrixDiff:
    """Compare two C-matrices class by class over their shared class names (in `a`'s order).

    Both are first restricted to the shared classes and renormalised (`subset`), so each row is
    a distribution over the same non-target classes. Per class: Jensen-Shannon divergence in
    bits, each matrix's top-1 neighbour, and the Spearman rank correlation of the row.
    """
    in_b = set(b.class_names)
    shared = [n for n in a.class_names if n in in_b]
    if len(shared) < MIN_DIFF_CLASSES:
        raise CMatrixError(
            f"diff: the two C-matrices share {len(shared)} class name(s) ({_listing(shared)}); "
            f"need at least {MIN_DIFF_CLASSES} to compare rows"
        )
    ra, rb = subset(a, shared), subset(b, shared)
    pa = remove_diagonal(ra.probs.double())
    pb = remove_diagonal(rb.probs.double())
    rows = []
    for i, name in enumerate(shared):
        rows.append(
            ClassDiff(
                name=name,
                js_bits=js_divergence_bits(pa[i], pb[i]),
                top1_a=_top1(pa[i], i, shared),
                top1_b=_top1(pb[i], i, shared),
                spearman=spearman(pa[i], pb[i]),
            )
        )
    in_a = set(a.class_names)
    return CMatrixDiff(
        classes=tuple(rows),
        only_in_a=tuple(n for n in a.class_names if n not in in_b),
        only_in_b=tuple(n for n in b.class_names if n not in in_a),
        alpha_a=float(a.alpha),
        alpha_b=float(b.alpha),
    )


def format_diff(d: CMatrixDiff, name_a: str = "A", name_b: str = "B") -> str:
    """The `kd cmatrix diff` table: one line per shared class, then a summary line."""
    width = max(5, *(len(c.name) for c in d.classes))
    nwidth = max(7, *(len(c.top1_a) for c in d.classes), *(len(c.top1_b) for c in d.classes))
    lines = [
        f"A = {name_a} (alpha {d.alpha_a:g}), B = {name_b} (alpha {d.alpha_b:g}); "
        f"{len(d.classes)} shared classes; JS divergence in bits (0 = same row, 1 = disjoint)",
        f"{'class':<{width}}  {'JS':>8}  {'top-1 A':<{nwidth}}  {'top-1 B':<{nwidth}}  agree  {'rho':>6}",
    ]
    for c in d.classes:
        rho = "n/a" if c.spearman is None else f"{c.spearman:.3f}"
        lines.append(
            f"{c.name:<{width}}  {c.js_bits:8.3g}  {c.top1_a:<{nwidth}}  {c.top1_b:<{nwidth}}  "
            f"{'yes' if c.agree else 'no':<5}  {rho:>6}"
        )
    agree = sum(c.agree for c in d.classes)
    rho = "n/a" if d.mean_spearman is None else f"{d.mean_spearman:.3f}"
    lines.append(
        f"summary: mean JS {d.mean_js_bits:.4g} bits (max {d.max_js.js_bits:.4g} at {_one_line(d.max_js.name, 40)}), "
        f"top-1 agreement {agree}/{len(d.classes)} ({d.top1_agreement:.2f}), mean rho {rho}; "
        f"only in A: {_listing(list(d.only_in_a))}; only in B: {_listing(list(d.only_in_b))}"
    )
    return "\n".join(lines)


def summary_line(cm: CMatrix) -> str:
    """One line: K, source, dataset, teacher, alpha (the `kd cmatrix validate` OK line)."""
    top1 = "" if cm.teacher_top1 is None else f" top1={cm.teacher_top1:.4f}"
    return (
        f"K={cm.num_classes} source={cm.source} dataset={cm.dataset or 'unknown'} "
        f"teacher={cm.teacher_model or 'unknown'}{top1} alpha={float(cm.alpha):g}"
    )


def show_dict(cm: CMatrix, top: int = 3) -> dict[str, Any]:
    """`kd cmatrix show --json`: the matrix's description and each class's top neighbours."""
    return {
        "class_names": list(cm.class_names),
        "num_classes": cm.num_classes,
        "alpha": float(cm.alpha),
        "source": cm.source,
        "dataset": cm.dataset,
        "teacher_model": cm.teacher_model,
        "teacher_top1": cm.teacher_top1,
        "created": cm.created,
        "neighbours": {name: [[other, p] for other, p in ns] for name, ns in top_neighbours(cm, top)},
        "metadata": cm.metadata(),
    }
