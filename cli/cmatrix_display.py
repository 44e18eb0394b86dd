"""Text, JSON and markdown display of C-matrices for the `kd cmatrix` commands: `show`, the
`validate` OK line, the `diff` table and the `card`. The library side (the artifact,
operations, diff) is in `kd/`."""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from kd.cmatrix.artifact import CMatrix, CMatrixError, quoted, quoted_names
from kd.cmatrix.diff import CMatrixDiff
from kd.losses import remove_diagonal


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


# ---------------------------------------------------------------------------------------------
# the markdown card (`kd cmatrix card`)

# Up to this many classes the card lists every name; above, the first and last few.
CARD_ALL_NAMES_MAX = 30
CARD_HEAD_NAMES, CARD_TAIL_NAMES = 20, 5
# Nested `sources` deeper than this are summarised, not rendered.
CARD_MAX_DEPTH = 8
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~$])")
_PROVENANCE_KEYS = ("sources", "parent_source", "parent_created")


def markdown_text(value: Any, limit: int = 200) -> str:
    """A value from the file as literal markdown text: one line, punctuation escaped, cut to `limit`."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def mutual_pairs(cm: CMatrix) -> list[tuple[str, str]]:
    """Pairs of classes that are each other's top neighbour, in class order."""
    top = {name: neighbours[0][0] for name, neighbours in top_neighbours(cm, 1)}
    pairs = []
    for name in cm.class_names:
        other = top[name]
        if top[other] == name and cm.class_names.index(name) < cm.class_names.index(other):
            pairs.append((name, other))
    return pairs


def _teacher_text(model: Any, top1: Any) -> str:
    text = markdown_text(model) if model else "unknown"
    if isinstance(top1, (int, float)) and not isinstance(top1, bool):
        text += f" (top-1 {float(top1):.4f})"
    else:
        text += " (accuracy not recorded)"
    return text


def _names_text(names: tuple[str, ...]) -> str:
    shown = [markdown_text(name, 60) for name in names]
    if len(shown) <= CARD_ALL_NAMES_MAX:
        return ", ".join(shown)
    hidden = len(shown) - CARD_HEAD_NAMES - CARD_TAIL_NAMES
    return f"{', '.join(shown[:CARD_HEAD_NAMES])}, \u2026 ({hidden} more) \u2026, {', '.join(shown[-CARD_TAIL_NAMES:])}"


def _source_lines(entries: list[Any], depth: int) -> list[str]:
    """Nested bullet lines for a `sources` list (each input, then its own inputs)."""
    indent = "  " * depth
    lines = []
    for entry in entries:
        if not isinstance(entry, dict):
            lines.append(f"{indent}- {markdown_text(entry)}")
            continue
        name = markdown_text(entry["file"]) if entry.get("file") else "an in-memory matrix"
        sha = f" (sha256 `{str(entry['sha256'])[:12]}\u2026`)" if re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))) else ""
        facts = [
            f"source {markdown_text(entry.get('source', '?'))}",
            f"dataset {markdown_text(entry.get('dataset') or 'unknown')}",
            f"teacher {_teacher_text(entry.get('teacher_model'), entry.get('teacher_top1'))}",
            f"alpha {markdown_text(entry.get('alpha', '?'))}",
            f"K={markdown_text(entry.get('num_classes', '?'))}",
            f"created {markdown_text(entry.get('created', '?'))}",
        ]
        lines.append(f"{indent}- from {name}{sha}: {', '.join(facts)}")
        inner = entry.get("sources")
        if isinstance(inner, list) and inner:
            if depth + 1 >= CARD_MAX_DEPTH:
                lines.append(f"{indent}  - ... {len(inner)} older input(s), not shown")
            else:
                lines.extend(_source_lines(inner, depth + 1))
    return lines


def _provenance_lines(cm: CMatrix) -> list[str]:
    lines = [
        f"- this file: source {markdown_text(cm.source)}, dataset {markdown_text(cm.dataset or 'unknown')}, "
        f"teacher {_teacher_text(cm.teacher_model, cm.teacher_top1)}, alpha {float(cm.alpha):g}, "
        f"created {markdown_text(cm.created)} (toolkit {markdown_text(cm.toolkit_version)})"
    ]
    if "sources" in cm.extra:
        try:
            sources = json.loads(cm.extra["sources"])
        except ValueError:
            sources = None
        if isinstance(sources, list):
            lines.extend(_source_lines(sources, 1))
        else:
            lines.append(f"  - sources (not a JSON list): {markdown_text(cm.extra['sources'])}")
    if "parent_source" in cm.extra:
        lines.append(
            f"  - re-ordered from a {markdown_text(cm.extra['parent_source'])} matrix created "
            f"{markdown_text(cm.extra.get('parent_created', 'unknown'))}"
        )
    others = {key: value for key, value in cm.extra.items() if key not in _PROVENANCE_KEYS}
    for key, value in sorted(others.items()):
        lines.append(f"- {markdown_text(key, 60)}: {markdown_text(value)}")
    return lines


def _link_target(path: str) -> str:
    target = path.replace("\\", "/")
    return f"<{target}>" if re.search(r"[\s()<>]", target) else target


def format_card(cm: CMatrix, file_name: str, sha256: str, *, top: int = 3, image: str | None = None) -> str:
    """The markdown card of `kd cmatrix card`: what to publish next to a shared C-matrix file.

    `sha256` is the file's checksum; `image` the heatmap's path as the card should link it.
    Every value read from the file is escaped, so class names cannot break the markdown.
    """
    names = cm.class_names
    lines = [
        f"# C-matrix card: {markdown_text(file_name)}",
        "",
        "| | |",
        "|---|---|",
        f"| classes | {cm.num_classes} |",
        f"| source | {markdown_text(cm.source)} |",
        f"| dataset | {markdown_text(cm.dataset or 'unknown')} |",
        f"| teacher | {_teacher_text(cm.teacher_model, cm.teacher_top1)} |",
        f"| alpha | {float(cm.alpha):g} |",
        f"| created | {markdown_text(cm.created)} |",
        f"| format | {markdown_text(cm.metadata()['format'])} {markdown_text(cm.metadata()['format_version'])}, "
        f"toolkit {markdown_text(cm.toolkit_version)} |",
        f"| sha256 | `{sha256}` |",
        "",
        f"**Classes ({cm.num_classes}):** {_names_text(names)}",
        "",
        "## Provenance",
        "",
        *_provenance_lines(cm),
        "",
        f"## Nearest classes (top {min(top, cm.num_classes - 1)})",
        "",
        "| class | neighbours (probability) |",
        "|---|---|",
    ]
    for name, neighbours in top_neighbours(cm, top):
        listed = ", ".join(f"{markdown_text(other, 60)} ({p:.3f})" for other, p in neighbours)
        lines.append(f"| {markdown_text(name, 60)} | {listed} |")
    pairs = mutual_pairs(cm)
    listed_pairs = ", ".join(f"{markdown_text(a, 60)} \u2194 {markdown_text(b, 60)}" for a, b in pairs) or "none"
    lines += ["", f"**Mutual top neighbours:** {listed_pairs}", ""]
    if image is not None:
        lines += ["## Heatmap", "", f"![C-matrix heatmap of {markdown_text(file_name)}]({_link_target(image)})", ""]
    lines += [
        "## Check and use",
        "",
        "```bash",
        f"kd cmatrix validate {file_name} --checksum   # must print sha256={sha256}",
        f"kd distill --proxy {file_name} --dataset ... --model ... --out student",
        "```",
        "",
    ]
    return "\n".join(lines)
