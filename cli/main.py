"""The `kd` command line: parses flags and calls a stage or the library; no training logic here."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import click

import kd
from kd.errors import KDError, one_line

# Every subcommand lives in a module loaded only when that command runs: the module and
# attribute, and the one-line help `kd --help` lists without importing anything (a test
# checks it equals each command's own).
COMMANDS = {
    "train-teacher": ("lspp_kd.cli.commands:train_teacher_command",
                      "Train a teacher network (with LS++ by default) and export its cmatrix.safetensors."),
    "distill": ("lspp_kd.cli.commands:distill_command",
                ("Train a student: from a proxy C-matrix (--proxy), a teacher network (--teacher RUN_DIR, or a "
                 "pretrained --teacher-model NAME with --teacher-weights FILE), or plain labels.")),
    "soft-labels": ("lspp_kd.cli.soft_label_commands:soft_labels_command",
                    "Store a teacher's per-sample logits over a training split, for `kd distill --soft-labels FILE`."),
    "cmatrix": ("lspp_kd.cli.cmatrix_commands:cmatrix_group", "Inspect, check and transform C-matrix files (cmatrix.safetensors)."),
    "methods": ("lspp_kd.cli.commands:methods_command", "List the training methods, the stages they serve and their parameters."),
    "compare": ("lspp_kd.cli.commands:compare_command", "Compare runs side by side: accuracy, calibration, time and memory."),
    "plot": ("lspp_kd.cli.plot_commands:plot_command", "Draw a finished run's figures into --out."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use (see `COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *(name for name in super().list_commands(ctx) if name not in COMMANDS)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            import importlib

            module, attribute = COMMANDS[name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in COMMANDS]
        rows += [(name, command.get_short_help_str()) for name, command in self.commands.items() if name not in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(kd.__version__, prog_name="kd")
def cli() -> None:
    """Knowledge distillation with Label Smoothing++: train teachers, share C-matrices, distill students."""


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="kd", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.Abort:
        click.echo("kd: aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        click.echo(f"kd: error: {one_line(error.format_message())}", err=True)
        sys.exit(error.exit_code)
    except KDError as error:
        click.echo(f"kd: error: {one_line(str(error))}", err=True)
        sys.exit(getattr(error, "exit_code", 1))  # 128 + the signal for a run stopped by SIGINT/SIGTERM
    sys.exit(code if isinstance(code, int) else 0)


def run_in_process(argv: Sequence[str]) -> subprocess.CompletedProcess:
    """`kd ARGV` through `main`, in this process, with its output captured and its exit status returned.

    For tests and scripts that run many short commands: no interpreter start-up per command.
    Accelerate's process-wide state is reset afterwards, so the next command starts clean. An
    unexpected exception propagates, just as a traceback would end the real command.
    """
    import contextlib
    import io

    from accelerate.state import AcceleratorState, GradientState

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return subprocess.CompletedProcess(["kd", *argv], code, stdout.getvalue(), stderr.getvalue())


if __name__ == "__main__":
    main()
