"""Comparison of two C-matrices, class by class (`kd cmatrix diff`): Jensen-Shannon divergence,
top-1 neighbour agreement and Spearman rank correlation of each shared class's row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from kd.cmatrix.artifact import CMatrix, CMatrixError, quoted_names
from kd.cmatrix.ops import subset
from kd.losses.functional import remove_diagonal

# `diff` needs at least this many shared classes: two non-target entries per row to compare.
MIN_DIFF_CLASSES = 3


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
            f"diff: the two C-matrices share {len(shared)} class name(s) ({quoted_names(shared)}); "
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
