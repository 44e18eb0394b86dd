"""`kd cmatrix ...`: inspect, check and transform C-matrix files (cmatrix.safetensors).

Every command reads files with `load_cmatrix` (all format checks, never executes code from the
file). Commands that write (`subset`, `merge`, `remap`) need `--out`, refuse an existing file
unless `--overwrite`, write atomically, and record the inputs' SHA-256 in the `sources` metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click

from lspp_kd.cli.files import check_out_file, check_png_name
from lspp_kd.cli.plot_commands import cmatrix_plot_command
from lspp_kd.cli.teacher_source import load_teacher_and_data, teacher_source_options
from kd.errors import KDError

FILE = click.Path(dir_okay=False)
CLASSES_FROM_HELP = (
    "Where the class names come from: a C-matrix file (its class names), or a dataset name "
    "(digits, cifar10, cifar100, mnist, fashionmnist, svhn, or imagefolder) read with --data-dir."
)
DATA_DIR_HELP = "Dataset root for --classes-from DATASET (torchvision datasets, imagefolder: train/<class>/*)."
OUT_HELP = "Output C-matrix file to write (refused if it exists, unless --overwrite)."
OVERWRITE_HELP = "Replace an existing --out file (written atomically: the old file stays if anything fails)."


@click.group("cmatrix")
def cmatrix_group() -> None:
    """Inspect, check and transform C-matrix files (cmatrix.safetensors).

    A C-matrix learned on one teacher is a small file anyone can use as a proxy teacher:
    validate it, restrict it to your classes (subset), re-order it (remap), or average several
    (merge). The format is specified in docs/cmatrix-format.md.
    """


# ---------------------------------------------------------------------------------------------
# helpers


def _classes_from(spec: str, data_dir: str | None) -> list[str]:
    """Class names from a C-matrix file or a dataset name (see CLASSES_FROM_HELP)."""
    from kd.cmatrix.artifact import load_cmatrix

    path = Path(spec)
    if path.is_file():
        return list(load_cmatrix(path).class_names)
    if path.is_dir():
        raise KDError(
            f"--classes-from {spec}: is a directory; for an ImageFolder tree use "
            f"--classes-from imagefolder --data-dir {spec}"
        )
    from kd.data.datasets import DATASET_NAMES, dataset_class_names, normalise_dataset_name

    if normalise_dataset_name(spec) not in DATASET_NAMES:
        raise KDError(
            f"--classes-from {spec}: no such file, and not a dataset name ({', '.join(DATASET_NAMES)})"
        )
    return dataset_class_names(spec, data_dir)


def _short(sha: str) -> str:
    return sha[:12]


def _write(out: Path, cm, inputs: Sequence[tuple[str, dict]]) -> None:
    from lspp_kd.cli.cmatrix_display import summary_line
    from kd.cmatrix.artifact import save_cmatrix

    save_cmatrix(out, cm)
    origin = ", ".join(f"{path} sha256 {_short(entry['sha256'])}" for path, entry in inputs)
    click.echo(f"wrote {out}: {summary_line(cm)} (from {origin})")


# ---------------------------------------------------------------------------------------------
# validate


@cmatrix_group.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--classes-from", "classes_from", metavar="FILE_OR_DATASET", help=(
    "Also require each file's class names to equal these, in order. " + CLASSES_FROM_HELP))
@click.option("--data-dir", type=click.Path(file_okay=False), help=DATA_DIR_HELP)
@click.option("--checksum", is_flag=True, help="Append each valid file's SHA-256 (to publish with a shared file).")
def cmatrix_validate_command(files: tuple[str, ...], classes_from: str | None, data_dir: str | None, checksum: bool) -> None:
    """Check every FILE against the C-matrix format; one line per file on stdout.

    A valid file prints `OK   FILE: K=.. source=.. dataset=.. teacher=.. alpha=..`, an invalid
    one `FAIL FILE: <reason>`. All files are checked; the exit status is 1 if any failed.
    """
    from lspp_kd.cli.cmatrix_display import summary_line
    from kd.cmatrix.artifact import PEAKED_ENTROPY, CMatrixError, check_class_names, file_sha256, load_cmatrix, peaked_rows, quoted_names

    expected = _classes_from(classes_from, data_dir) if classes_from is not None else None
    failed = 0
    for file in files:
        try:
            cm = load_cmatrix(file)
            if expected is not None:
                try:
                    check_class_names(cm, expected, file)
                except CMatrixError as error:
                    if set(cm.class_names) != set(expected):
                        raise
                    fix = f" --data-dir {data_dir}" if data_dir else ""
                    raise CMatrixError(
                        f"{error}; or write a re-ordered copy with "
                        f"`kd cmatrix remap {file} --classes-from {classes_from}{fix} --out NEW_FILE`"
                    ) from None
            line = f"OK   {file}: {summary_line(cm)}"
            peaked = peaked_rows(cm)
            if peaked:  # a warning, not a failure: the C-loss ablation legitimately makes such matrices
                click.echo(
                    f"kd: warning: {file}: {len(peaked)} row(s) put nearly all their mass on one class "
                    f"(normalised entropy < {PEAKED_ENTROPY}): {quoted_names(peaked)}", err=True,
                )
            if checksum:
                line += f" sha256={file_sha256(file)}"
        except KDError as error:
            failed += 1
            reason = " ".join(str(error).split())
            line = f"FAIL {reason}" if reason.startswith(f"{file}: ") else f"FAIL {file}: {reason}"
        click.echo(line)
    if failed:
        raise KDError(f"{failed} of {len(files)} file(s) failed validation")


# ---------------------------------------------------------------------------------------------
# show


@cmatrix_group.command("show")
@click.argument("file", type=FILE)
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="Neighbours shown per class.")
@click.option("--json", "as_json", is_flag=True, help=(
    "Print JSON instead: class_names, alpha, source, dataset, teacher, neighbours "
    "({class: [[name, prob], ...]}) and the raw metadata."))
def cmatrix_show_command(file: str, top: int, as_json: bool) -> None:
    """Print, for each class, its top non-target classes and their probabilities."""
    from lspp_kd.cli.cmatrix_display import format_show, show_dict
    from kd.cmatrix.artifact import load_cmatrix

    cm = load_cmatrix(file)
    if as_json:
        click.echo(json.dumps({"file": file, **show_dict(cm, top)}, indent=2, ensure_ascii=False))
    else:
        click.echo(format_show(cm, top=top))


# ---------------------------------------------------------------------------------------------
# diff


@cmatrix_group.command("diff")
@click.argument("a", type=FILE)
@click.argument("b", type=FILE)
@click.option("--json", "as_json", is_flag=True, help="Print the per-class records and the summary as JSON.")
def cmatrix_diff_command(a: str, b: str, as_json: bool) -> None:
    """Compare two C-matrices class by class over their shared class names.

    Both are restricted to the shared classes (in A's order) and renormalised; then per class:
    Jensen-Shannon divergence in bits (0 = same row, 1 = disjoint), the top-1 neighbour in A
    and in B and whether they agree, and Spearman's rank correlation rho of the row. A summary
    line gives the means and the classes found in only one file. Needs 3 shared classes.
    """
    from lspp_kd.cli.cmatrix_display import format_diff
    from kd.cmatrix.artifact import load_cmatrix
    from kd.cmatrix.diff import diff

    result = diff(load_cmatrix(a), load_cmatrix(b))
    if as_json:
        click.echo(json.dumps({"a": a, "b": b, **result.to_dict()}, indent=2, ensure_ascii=False))
    else:
        click.echo(format_diff(result, a, b))


# ---------------------------------------------------------------------------------------------
# subset, merge, remap


@cmatrix_group.command("subset")
@click.argument("file", type=FILE)
@click.option("--classes", metavar="A,B,C", help=(
    "Comma-separated class names to keep, in the order wanted (at least 2). "
    "For names containing commas use --classes-from."))
@click.option("--classes-from", "classes_from", metavar="FILE_OR_DATASET", help=(
    "Keep these classes, in this order, instead of --classes. " + CLASSES_FROM_HELP))
@click.option("--data-dir", type=click.Path(file_okay=False), help=DATA_DIR_HELP)
@click.option("--out", required=True, type=click.Path(), help=OUT_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def cmatrix_subset_command(
    file: str, classes: str | None, classes_from: str | None, data_dir: str | None, out: str, overwrite: bool
) -> None:
    """Restrict FILE to some classes and renormalise each row over the kept classes.

    So a C-matrix learned on 100 classes serves a task on 10 of them. The ratios between kept
    entries of a row are unchanged. The result has source=subset and records FILE's SHA-256.
    """
    from kd.cmatrix.artifact import load_cmatrix
    from kd.cmatrix.ops import source_entry, subset

    if (classes is None) == (classes_from is None):
        raise KDError("subset needs exactly one of --classes A,B,C or --classes-from FILE_OR_DATASET")
    target = check_out_file(out, overwrite)
    if classes is not None:
        names = [name.strip() for name in classes.split(",")]
        if any(not name for name in names):
            raise KDError(f"--classes {classes!r} has an empty class name; give names separated by commas")
    else:
        names = _classes_from(classes_from, data_dir)
    cm = load_cmatrix(file)
    entry = source_entry(cm, file)
    _write(target, subset(cm, names, [entry]), [(file, entry)])


@cmatrix_group.command("merge")
@click.argument("files", nargs=-1, required=True, type=FILE)
@click.option("--out", required=True, type=click.Path(), help=OUT_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def cmatrix_merge_command(files: tuple[str, ...], out: str, overwrite: bool) -> None:
    """Average two or more C-matrices over the same class names (an ensemble proxy teacher).

    Classes are matched by name and the result uses the first file's class order. Rows are the
    mean of the files' rows, alpha the mean alpha; teacher_top1 is left unknown. Every file must
    have the same set of class names (use subset first otherwise).
    """
    from kd.cmatrix.artifact import load_cmatrix
    from kd.cmatrix.ops import merge, source_entry

    if len(files) < 2:
        raise KDError(f"merge needs at least 2 files, got {len(files)}")
    target = check_out_file(out, overwrite)
    cms = [load_cmatrix(f) for f in files]
    entries = [source_entry(cm, f) for cm, f in zip(cms, files)]
    _write(target, merge(cms, entries, names=list(files)), list(zip(files, entries)))


@cmatrix_group.command("remap")
@click.argument("file", type=FILE)
@click.option("--classes-from", "classes_from", required=True, metavar="FILE_OR_DATASET", help=(
    "The class order to produce (same class names as FILE). " + CLASSES_FROM_HELP))
@click.option("--data-dir", type=click.Path(file_okay=False), help=DATA_DIR_HELP)
@click.option("--out", required=True, type=click.Path(), help=OUT_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def cmatrix_remap_command(file: str, classes_from: str, data_dir: str | None, out: str, overwrite: bool) -> None:
    """Re-order FILE's rows and columns to another class order, matching classes by name.

    The result has source=remap and records FILE's SHA-256. To drop classes, use subset.
    """
    from kd.cmatrix.artifact import load_cmatrix
    from kd.cmatrix.ops import remap, source_entry

    target = check_out_file(out, overwrite)
    names = _classes_from(classes_from, data_dir)
    cm = load_cmatrix(file)
    entry = source_entry(cm, file)
    _write(target, remap(cm, names, [entry]), [(file, entry)])


@cmatrix_group.command("from-teacher")
@teacher_source_options("to average over")
@click.option("--out", required=True, type=click.Path(), help=OUT_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--alpha", type=float, default=None, help=(
    "Mixing mass a recorded in the file (default: the teacher's alpha, else the paper's 0.1)."))
def from_teacher_command(run_dir: str | None, teacher_model: str | None, teacher_weights: str | None,
                         teacher_image_size: int | None, teacher_classes: str | None, dataset: str | None,
                         data_dir: str | None, batch_size: int, out: str, overwrite: bool, alpha: float | None) -> None:
    """Average a trained network's non-target predictions per class over a training set (source = posthoc).

    The network is a teacher run (RUN_DIR) or a pretrained classifier (--teacher-model NAME
    --teacher-weights FILE), which sees the data de-normalised, resized to its input size and
    normalised with its own mean and std.
    """
    from kd.cmatrix.artifact import save_cmatrix
    from kd.cmatrix.posthoc import posthoc_cmatrix
    from kd.training.loop import make_accelerator

    if alpha is not None and not 0.0 <= alpha < 1.0:
        raise KDError(f"--alpha must be in [0, 1), got {alpha}")
    target = check_out_file(out, overwrite)
    teacher, data, _, _ = load_teacher_and_data("from-teacher", run_dir, teacher_model, teacher_weights, teacher_image_size,
                                                teacher_classes, dataset, data_dir)
    cm = posthoc_cmatrix(teacher, data, batch_size, make_accelerator(), alpha)
    save_cmatrix(target, cm)
    click.echo(f"wrote {out}: posthoc C-matrix of {teacher.model} over {len(data.class_names)} classes")


@cmatrix_group.command("card")
@click.argument("file", type=FILE)
@click.option("--out", type=click.Path(), help=(
    "Markdown file to write the card to (default: print it). Refused if it exists, unless --overwrite."))
@click.option("--image", type=click.Path(), metavar="PNG", help=(
    "Also draw the heatmap (as `kd cmatrix plot` does) to this PNG and link it from the card, relative to "
    "--out's folder. Refused if it exists, unless --overwrite."))
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="Neighbours listed per class.")
@click.option("--overwrite", is_flag=True, help="Replace existing --out and --image files (written atomically).")
def cmatrix_card_command(file: str, out: str | None, image: str | None, top: int, overwrite: bool) -> None:
    """Write a markdown card for FILE: what to publish next to a shared C-matrix.

    It holds the class count and names (abbreviated when many), the provenance chain from the
    file's metadata (source, dataset, teacher and its top-1, alpha, and the inputs of a
    merge, subset or remap with their checksums), each class's top neighbours, the mutual
    top-neighbour pairs, the file's SHA-256 and, with --image, the heatmap.
    """
    import os

    from lspp_kd.cli.cmatrix_display import format_card
    from kd.cmatrix.artifact import file_sha256, load_cmatrix
    from kd.io import write_text_atomic
    from kd.reports.plots import plot_cmatrix

    card_path = check_out_file(out, overwrite, example="CARD.md") if out is not None else None
    image_path = check_out_file(image, overwrite, example="cmatrix.png", flag="--image") if image is not None else None
    if image is not None:
        check_png_name(image, "the heatmap", flag="--image")
    if card_path is not None and image_path is not None and card_path.resolve() == image_path.resolve():
        raise KDError(f"--out and --image are the same file ({out}); give the card and the heatmap different names")
    cm = load_cmatrix(file)
    link = None
    if image_path is not None:
        plot_cmatrix(cm, image_path)
        link = os.path.relpath(image_path.resolve(), card_path.resolve().parent) if card_path is not None else image
    card = format_card(cm, Path(file).name, file_sha256(file), top=top, image=link)
    if card_path is None:
        click.echo(card, nl=False)
        return
    write_text_atomic(card_path, card)
    click.echo(f"wrote {out}" + (f" and {image}" if image is not None else "") + f": {Path(file).name} card")


# `kd cmatrix plot` is defined with the other figure commands.
cmatrix_group.add_command(cmatrix_plot_command)
