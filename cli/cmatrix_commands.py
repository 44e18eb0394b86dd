"""`kd cmatrix ...`: inspect and work with C-matrix files (cmatrix.safetensors)."""

from __future__ import annotations

import click


@click.group("cmatrix")
def cmatrix_group() -> None:
    """Inspect and work with C-matrix files (cmatrix.safetensors)."""


@cmatrix_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="Neighbours shown per class.")
def cmatrix_show_command(file: str, top: int) -> None:
    """Print, for each class, its top non-target classes and their probabilities."""
    from kd.cmatrix import format_show, load_cmatrix

    click.echo(format_show(load_cmatrix(file), top=top))
