"""Text and JSON display of C-matrices for the `kd cmatrix` commands: `show`, the `validate`
OK line and the `diff` table. The library side (the artifact, operations, diff) is in `kd/`."""

from __future__ import annotations

from typing import Any

import torch

from kd.cmatrix import CMatrix, CMatrixError, quoted, quoted_names
from kd.cmatrix_diff import CMatrixDiff
from kd.lspp import remove_diagonal


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
        f"summary: mean JS {d.mean_js_bits:.4g} bits (max {d.max_js.js_bits:.4g} at {quoted(d.max_js.name, 40)}), "
        f"top-1 agreement {agree}/{len(d.classes)} ({d.top1_agreement:.2f}), mean rho {rho}; "
        f"only in A: {quoted_names(list(d.only_in_a))}; only in B: {quoted_names(list(d.only_in_b))}"
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
