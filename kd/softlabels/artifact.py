"""Stored soft labels: a teacher's per-sample logits over a training split, as a shareable file.

`soft_labels.safetensors` (format "kd-soft-labels", version 1.0) holds, for each training
sample, the teacher's logits: the whole row (N x K), or its top k (`logits` N x k with their
class `indices` N x k) plus one `rest` logit per sample (N) that every class not stored gets.
`rest` is chosen so that at temperature 1 the reconstructed row gives each stored class exactly
its probability and the other classes together exactly their mass, spread evenly:
rest = logsumexp(the other logits) - log(K - k). At another temperature, and for methods that
read the whole row's shape (DIST, logit standardisation), top-k is an approximation; the whole
row (the default when K <= `WHOLE_ROW_MAX`) is exact.

The samples are named (`sample_names`, a UTF-8 tensor of newline-separated names): an ImageFolder
image by its path under train/, a built-in dataset's sample by its position ("0".."N-1"), with
the data fingerprint (`kd.data.fingerprint`) that pins which dataset those positions are in. A
student's training split (any `--val-split` / `--train-per-class` selection of the same data)
finds its rows by name. Loading never executes code; every problem is one line naming the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch import nn

from kd import __version__
from kd.errors import KDError
from kd.io import save_safetensors_atomic

FORMAT_NAME = "kd-soft-labels"
FORMAT_VERSION = "1.0"
# Up to this many classes the whole logit row is stored by default (CIFAR-100's 100 x 4 bytes a sample).
WHOLE_ROW_MAX = 100
DEFAULT_TOP_K = 100
_REQUIRED = ("format", "format_version", "num_classes", "class_names", "num_samples", "top_k", "dataset",
             "data_fingerprint", "teacher_model", "view", "toolkit_version", "created")


class SoftLabelsError(KDError):
    """A bad soft-label file, or one that does not fit the data; the one line starts with the file's path."""


def _fail(where: str, problem: str) -> SoftLabelsError:
    return SoftLabelsError(" ".join(f"{where}: {problem}".splitlines()))


@dataclass(eq=False)
class SoftLabelFile:
    """A teacher's logits per named sample (see the module docstring); `indices`/`rest` only for top-k."""

    logits: torch.Tensor  # N x k float32
    sample_names: list[str]
    class_names: tuple[str, ...]
    dataset: str
    data_fingerprint: str
    teacher_model: str
    view: str  # what the teacher saw ("un-augmented 32x32 training images (evaluation view)")
    indices: torch.Tensor | None = None  # N x k int64 class indices of `logits`, or None: whole rows
    rest: torch.Tensor | None = None  # N float32: the logit of every class not stored
    extra: dict[str, str] = field(default_factory=dict)  # provenance: teacher run, weights file and sha256
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def top_k(self) -> int:
        return int(self.logits.shape[1])

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top_k: int | None = None, **info: Any) -> SoftLabelFile:
        """Keep the whole N x K rows (`top_k` None or >= K), or each row's top k and the `rest` logit."""
        logits = logits.float()
        k = logits.shape[1]
        if top_k is None or top_k >= k:
            return cls(logits=logits.contiguous(), **info)
        if top_k < 1:
            raise KDError(f"--top-k must be a positive whole number, got {top_k}")
        values, indices = logits.topk(top_k, dim=1)
        others = logits.scatter(1, indices, -math.inf)  # the classes not kept
        rest = torch.logsumexp(others, dim=1) - math.log(k - top_k)
        return cls(logits=values.contiguous(), indices=indices.contiguous(), rest=rest.contiguous(), **info)

    def full_logits(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The N x K logit rows at `rows` (exact for whole rows; top-k rows with `rest` elsewhere)."""
        if self.indices is None:
            return self.logits[rows]
        return expand_top_k(self.logits[rows], self.indices[rows], self.rest[rows], self.num_classes)


def expand_top_k(values: torch.Tensor, columns: torch.Tensor, rest: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Whole logit rows from each row's top-k `values` at class `columns`, every other class at `rest`."""
    return rest[:, None].expand(-1, num_classes).clone().scatter_(1, columns, values)


def save_soft_labels(path: str | os.PathLike, file: SoftLabelFile) -> None:
    """Write `file` atomically (a failed write leaves any old file as it was), readable per the umask."""
    _check_values(file, str(path))
    tensors = {"logits": file.logits.float(), "sample_names": _encode_names(file.sample_names)}
    if file.indices is not None:
        tensors["indices"], tensors["rest"] = file.indices.to(torch.int64), file.rest.float()
    metadata = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "num_classes": str(file.num_classes),
        "class_names": json.dumps(list(file.class_names), ensure_ascii=False), "num_samples": str(len(file.sample_names)),
        "top_k": str(file.top_k), "dataset": file.dataset, "data_fingerprint": file.data_fingerprint,
        "teacher_model": file.teacher_model, "view": file.view, "toolkit_version": __version__, "created": file.created,
        **{key: str(value) for key, value in file.extra.items() if key not in _REQUIRED},
    }
    save_safetensors_atomic(path, tensors, metadata)


def _encode_names(names: Sequence[str]) -> torch.Tensor:
    for name in names:
        if not name or "\n" in name:
            raise KDError(f"a sample name must be non-empty and one line, got {name!r}")
    return torch.frombuffer(bytearray("\n".join(names).encode("utf-8")), dtype=torch.uint8).clone()


def _decode_names(tensor: torch.Tensor, count: int, where: str) -> list[str]:
    try:
        names = bytes(tensor.numpy().tobytes()).decode("utf-8").split("\n") if count else []
    except UnicodeDecodeError:
        raise _fail(where, "sample_names is not UTF-8 text") from None
    if len(names) != count:
        raise _fail(where, f"{len(names)} sample names for num_samples {count}")
    if len(set(names)) != count:
        raise _fail(where, "a sample name appears more than once")
    return names


def load_soft_labels(path: str | os.PathLike) -> SoftLabelFile:
    """Read and fully check a soft-label file (format, shapes, dtypes, finite values, names)."""
    where, file = str(path), Path(path)
    if not file.exists():
        raise _fail(where, "file not found")
    if file.is_dir():
        raise _fail(where, "is a directory, not a soft-label file")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            meta = reader.metadata() or {}
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except PermissionError as error:
        raise _fail(where, f"cannot read the file: {error.strerror or 'permission denied'}") from None
    except Exception:  # noqa: BLE001 - whatever safetensors raises on a bad file, and OSError
        raise _fail(where, "not a valid safetensors file (truncated or corrupt?)") from None
    if meta.get("format") != FORMAT_NAME:
        raise _fail(where, f"not a soft-label file (format {meta.get('format')!r}, expected {FORMAT_NAME!r})")
    if not meta.get("format_version", "").startswith("1."):
        raise _fail(where, f"format_version {meta.get('format_version')!r} is not one this toolkit reads (1.x)")
    missing = [key for key in _REQUIRED if key not in meta]
    if missing:
        raise _fail(where, f"missing metadata key {missing[0]!r}")
    try:
        class_names = tuple(json.loads(meta["class_names"]))
        num_classes, num_samples, top_k = int(meta["num_classes"]), int(meta["num_samples"]), int(meta["top_k"])
    except (ValueError, TypeError):
        raise _fail(where, "malformed class_names, num_classes, num_samples or top_k") from None
    if len(class_names) != num_classes or len(set(class_names)) != num_classes or not all(isinstance(n, str) for n in class_names):
        raise _fail(where, f"class_names must be {num_classes} distinct strings")
    if "logits" not in tensors or "sample_names" not in tensors:
        raise _fail(where, "tensor 'logits' or 'sample_names' is missing")
    whole = top_k == num_classes
    expected = {"logits": ((num_samples, top_k), torch.float32), "sample_names": (None, torch.uint8)}
    if not whole:
        expected.update(indices=((num_samples, top_k), torch.int64), rest=((num_samples,), torch.float32))
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            raise _fail(where, f"tensor {name!r} is missing (top_k {top_k} of {num_classes} classes)")
        tensor = tensors[name]
        if tensor.dtype != dtype or (shape is not None and tuple(tensor.shape) != shape):
            raise _fail(where, f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
    info = {key: meta[key] for key in ("dataset", "data_fingerprint", "teacher_model", "view", "created")}
    extra = {key: value for key, value in meta.items() if key not in _REQUIRED}
    loaded = SoftLabelFile(
        logits=tensors["logits"], sample_names=_decode_names(tensors["sample_names"], num_samples, where),
        class_names=class_names, indices=tensors.get("indices") if not whole else None,
        rest=tensors.get("rest") if not whole else None, extra=extra, **info,
    )
    _check_values(loaded, where)
    return loaded


def _check_values(file: SoftLabelFile, where: str) -> None:
    if not 1 <= file.top_k <= file.num_classes:
        raise _fail(where, f"top_k {file.top_k} is not between 1 and the {file.num_classes} classes")
    if file.logits.shape[0] != len(file.sample_names):
        raise _fail(where, f"{file.logits.shape[0]} logit rows for {len(file.sample_names)} sample names")
    for name, tensor in (("logits", file.logits), ("rest", file.rest)):
        if tensor is not None and not torch.isfinite(tensor).all():
            row = int(torch.nonzero((~torch.isfinite(tensor.reshape(len(tensor), -1))).any(dim=1))[0])
            raise _fail(where, f"non-finite {name} for sample {file.sample_names[row]!r}")
    if file.indices is not None:
        if file.top_k == file.num_classes:
            raise _fail(where, "class indices stored for whole rows")
        if file.indices.numel() and (file.indices.min() < 0 or file.indices.max() >= file.num_classes):
            raise _fail(where, f"class indices outside 0..{file.num_classes - 1}")
        ordered = file.indices.sort(dim=1).values
        if file.top_k > 1 and (ordered[:, 1:] == ordered[:, :-1]).any():
            raise _fail(where, "a sample lists the same class twice among its top-k")


class SoftLabels(nn.Module):
    """A stored teacher for one training split: `module(sample_indices)` gives those samples' logits.

    Built from a `SoftLabelFile` and the split's sample names (`kd.data.datasets.sample_names`);
    the file's class names must be the data's, in order, and it must name every training sample.
    The rows live in non-persistent buffers: they move to the device with the training module
    but stay out of checkpoints. `stored = True` tells `kd.methods.teacher.TeacherKD` to look
    logits up by sample index instead of running a network.
    """

    stored = True

    def __init__(self, file: SoftLabelFile, train_names: Sequence[str], class_names: Sequence[str], where: str) -> None:
        super().__init__()
        if tuple(class_names) != file.class_names:
            same_set = set(class_names) == set(file.class_names)
            raise _fail(where, "class names differ from the dataset's" + (" (same classes, other order)" if same_set else ""))
        position = {name: row for row, name in enumerate(file.sample_names)}
        missing = [name for name in train_names if name not in position]
        if missing:
            raise _fail(where, f"{len(missing)} of the {len(train_names)} training samples have no soft labels, "
                               f"the first: {missing[0]!r} (made for other data?)")
        rows = torch.tensor([position[name] for name in train_names], dtype=torch.long)
        self.num_classes = file.num_classes
        self.register_buffer("values", file.logits[rows].contiguous(), persistent=False)
        self.register_buffer("columns", file.indices[rows].contiguous() if file.indices is not None else None, persistent=False)
        self.register_buffer("rest", file.rest[rows].contiguous() if file.rest is not None else None, persistent=False)

    def forward(self, sample_indices: torch.Tensor) -> torch.Tensor:
        if sample_indices is None:
            raise RuntimeError("stored soft labels need the batch's sample indices (StepContext.indices)")
        if self.columns is None:
            return self.values[sample_indices]
        return expand_top_k(self.values[sample_indices], self.columns[sample_indices], self.rest[sample_indices], self.num_classes)
