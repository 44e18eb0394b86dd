"""Operations that derive a new C-matrix from others: `subset`, `merge`, `remap` (the `kd cmatrix`
subset/merge/remap commands), and the `sources` provenance they record.

Every result is a `kd.cmatrix.CMatrix` with `source` set to the operation's name; the
provenance keys are described in docs/cmatrix-format.md, "Provenance".
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from kd.cmatrix.artifact import CMatrix, CMatrixError, file_sha256, quoted_names, remap_by_name, reorder, select_logits

# Extra metadata keys written by the tools below (see docs/cmatrix-format.md, "Provenance").
PROVENANCE_KEYS = ("sources", "parent_source", "parent_created")


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
        raise CMatrixError(f"subset: class {quoted_names(duplicates)} named more than once")
    index = {name: i for i, name in enumerate(cm.class_names)}
    unknown = [n for n in target if n not in index]
    if unknown:
        raise CMatrixError(
            f"subset: no class {quoted_names(unknown)} in the C-matrix (its classes: {quoted_names(list(cm.class_names), 8)})"
        )
    logits = select_logits(cm.logits.detach().cpu().float(), [index[n] for n in target])
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
    """`kd.cmatrix.artifact.reorder` (always a new `source = "remap"` matrix) with `sources` provenance.

    `class_names` must be the same set as `cm`'s; a strict subset is refused with a pointer to
    `subset`.
    """
    out = reorder(cm, class_names, "remap")
    entries = sources if sources is not None else [source_entry(cm)]
    return replace(out, extra={**out.extra, "sources": _sources_json(entries)})


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
                f"{quoted_names(only_here)}; only in {labels[0]}: {quoted_names(only_first)}; "
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
