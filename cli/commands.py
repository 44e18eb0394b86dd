"""The training and report commands: `kd train-teacher`, `kd distill`, `kd methods`, `kd compare`.

Loaded by `cli.main` only when one of them runs (or shows its help), so `kd --help` and
`kd --version` never import torch.
"""

from __future__ import annotations

import click

from lspp_kd.cli.config_file import config_option
from lspp_kd.cli.options import method_options, settings_options
from kd.io import write_text_atomic
from kd.training.settings import RUN_SETTINGS
from lspp_kd.students.settings import STUDENT_SETTINGS


def _settings(cls: type, stage: str, options: dict):
    from kd.methods import stage_params
    from kd.training.settings import from_flags

    return from_flags(cls, options, stage_params(stage))


@click.command("train-teacher")
@config_option("teacher")
@settings_options(RUN_SETTINGS)
@method_options("teacher", "lspp, which exports cmatrix.safetensors; so does ols")
def train_teacher_command(**options) -> None:
    """Train a teacher network (with LS++ by default) and export its cmatrix.safetensors."""
    from kd.training.settings import Settings
    from lspp_kd.teachers.train import train_teacher

    train_teacher(_settings(Settings, "teacher", options))


@click.command("distill")
@config_option("student")
@settings_options(RUN_SETTINGS + STUDENT_SETTINGS)
@method_options("student", "proxy with --proxy, kd with --teacher or --teacher-model, onehot with neither")
def distill_command(**options) -> None:
    """Train a student: from a proxy C-matrix (--proxy), a teacher network (--teacher RUN_DIR, or a pretrained
    --teacher-model NAME with --teacher-weights FILE), or plain labels."""
    from lspp_kd.students.distill import StudentSettings, distill

    distill(_settings(StudentSettings, "student", options))


@click.command("methods")
@click.option("--markdown", is_flag=True, help="Print the table as markdown (the method table of docs/methods.md).")
def methods_command(markdown: bool) -> None:
    """List the training methods, the stages they serve and their parameters."""
    from kd.methods import REGISTRY, format_default, get_method, methods_markdown

    if markdown:
        click.echo(methods_markdown(), nl=False)
        return
    for name in REGISTRY:
        cls = get_method(name)
        click.echo(f"{name:<7} [{'/'.join(cls.stages)}] {cls.summary}")
        for param in cls.params:
            click.echo(f"          {param.flag} ({format_default(param.default)}): {param.help}")


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Also write the table as markdown to this file.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the table as CSV to this file.")
def compare_command(run_dirs: tuple[str, ...], markdown_path: str | None, csv_path: str | None) -> None:
    """Compare runs side by side: accuracy, calibration, time and memory."""
    from kd.reports.compare import compare_rows, to_csv, to_markdown, to_text

    rows = compare_rows(run_dirs)
    click.echo(to_text(rows))
    if markdown_path:
        write_text_atomic(markdown_path, to_markdown(rows))
    if csv_path:
        write_text_atomic(csv_path, to_csv(rows))
