"""A teacher and the data it runs over, for the commands that run one once: `kd cmatrix from-teacher`, `kd soft-labels`.

The teacher is a finished run (RUN_DIR) or a pretrained classifier (`--teacher-model NAME
--teacher-weights FILE`); the data is the run's own unless `--dataset`/`--data-dir` say otherwise.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from lspp_kd.cli.options import apply_options
from kd.errors import KDError
from kd.models.pretrained import TEACHER_CLASSES_HELP, TEACHER_IMAGE_SIZE_HELP, TEACHER_MODEL_HELP, TEACHER_WEIGHTS_HELP


def teacher_source_options(what: str) -> Callable:
    """RUN_DIR, the pretrained-teacher flags, --dataset, --data-dir and --batch-size; `what` the pass's purpose."""
    return apply_options([
        click.argument("run_dir", required=False, type=click.Path(file_okay=False)),
        click.option("--teacher-model", metavar="NAME", help=TEACHER_MODEL_HELP + " Instead of RUN_DIR."),
        click.option("--teacher-weights", type=click.Path(dir_okay=False), help=TEACHER_WEIGHTS_HELP),
        click.option("--teacher-image-size", type=int, default=None, metavar="N", help=TEACHER_IMAGE_SIZE_HELP),
        click.option("--teacher-classes", type=click.Path(dir_okay=False), help=TEACHER_CLASSES_HELP),
        click.option("--dataset", default=None, help=f"Dataset {what} (default: the teacher run's own; digits with --teacher-model)."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Dataset root (default: the teacher run's own)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Batch size for the pass over the training split."),
    ])


def load_teacher_and_data(command: str, run_dir: str | None, teacher_model: str | None, teacher_weights: str | None,
                          teacher_image_size: int | None, teacher_classes: str | None, dataset: str | None,
                          data_dir: str | None) -> tuple[Any, Any, str, str | None]:
    """(the `kd.models.pretrained.Teacher`, the data, the dataset's name, its directory).

    A run's data is the run's own splits (its --train-per-class / --val-split selection, with its seed).
    """
    from kd.models.pretrained import check_pretrained_flags, load_pretrained_teacher, load_run_teacher
    from kd.training.run_data import load_run_data

    if (run_dir is None) == (teacher_model is None):
        raise KDError(f"{command} needs exactly one of RUN_DIR or --teacher-model NAME (with --teacher-weights FILE)")
    check_pretrained_flags(teacher_model, teacher_weights, teacher_image_size, teacher_classes)
    if run_dir is not None:
        teacher, config = load_run_teacher(run_dir)
        data = load_run_data(run_dir, config, dataset, data_dir)
        return teacher, data, dataset or config.get("dataset", "digits"), data_dir or config.get("data_dir")
    from kd.data.datasets import load_dataset

    pretrained = load_pretrained_teacher(teacher_model, teacher_weights, teacher_image_size, teacher_classes)
    data = load_dataset(dataset or "digits", data_dir)
    return pretrained.build(data), data, dataset or "digits", data_dir
