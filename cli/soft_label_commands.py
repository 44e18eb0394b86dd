"""`kd soft-labels`: run a teacher once over a training split and store its logits per sample."""

from __future__ import annotations

import click

from lspp_kd.cli.files import check_out_file
from lspp_kd.cli.teacher_source import load_teacher_and_data, teacher_source_options


@click.command("soft-labels")
@teacher_source_options("whose training split to label (the teacher run's own split: its --train-per-class / --val-split selection)")
@click.option("--out", required=True, type=click.Path(), help=(
    "Soft-label file to write, e.g. soft_labels.safetensors (refused if it exists, unless --overwrite)."))
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file (written atomically: the old file stays if anything fails).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, metavar="K", help=(
    "Logits kept per sample: the K largest, every other class sharing the rest of the probability "
    "mass. Default: the whole row up to 100 classes (exact), else 100."))
def soft_labels_command(run_dir: str | None, teacher_model: str | None, teacher_weights: str | None,
                        teacher_image_size: int | None, teacher_classes: str | None, dataset: str | None,
                        data_dir: str | None, batch_size: int, out: str, overwrite: bool, top_k: int | None) -> None:
    """Store a teacher's per-sample logits over a training split, for `kd distill --soft-labels FILE`.

    The teacher (a run, RUN_DIR, or a pretrained --teacher-model NAME --teacher-weights FILE) runs
    once, on the un-augmented images; students then train with any per-sample KD method (kd,
    dkd, dist) at the cost of a plain student. The samples are named (ImageFolder: the path
    under train/; built-in datasets: the position), so a student on the same images, or on a
    selection of them (--val-split, --train-per-class), finds its rows.
    """
    from kd.softlabels.artifact import save_soft_labels
    from kd.softlabels.export import teacher_soft_labels
    from kd.training.loop import make_accelerator

    target = check_out_file(out, overwrite, example="soft_labels.safetensors")
    teacher, data, dataset, data_dir = load_teacher_and_data("soft-labels", run_dir, teacher_model, teacher_weights,
                                                             teacher_image_size, teacher_classes, dataset, data_dir)
    labels = teacher_soft_labels(teacher, data, dataset, data_dir, batch_size, make_accelerator(), top_k)
    save_soft_labels(target, labels)
    kept = "whole rows" if labels.indices is None else f"top {labels.top_k} of {labels.num_classes} logits"
    click.echo(f"wrote {out}: soft labels of {teacher.model} for {len(labels.sample_names)} training samples ({kept})")
