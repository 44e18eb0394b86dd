"""Click options made from declarations: run settings (`kd.training.settings`) and method parameters (`kd.methods`)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import click

from kd.training.settings import Setting

_PATHS = {"dir": click.Path(file_okay=False), "file": click.Path(dir_okay=False), "any": click.Path()}


def apply_options(options: list[Callable]) -> Callable:
    """A decorator applying `options` so that `--help` lists them in the given order."""

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def setting_option(setting: Setting) -> Callable:
    """The click option of one declared setting."""
    if setting.type is bool:
        decl = f"{setting.flag}/--no-{setting.flag[2:]}" if setting.negatable else setting.flag
        return click.option(decl, setting.name, is_flag=True, default=setting.default, show_default=setting.negatable,
                            help=setting.help)
    kind: Any = setting.type
    if setting.choices:
        kind = click.Choice(setting.choices)
    elif setting.path:
        kind = _PATHS[setting.path]
    return click.option(
        setting.flag, setting.name, type=kind, default=setting.default, required=setting.required,
        metavar=setting.metavar, show_default=setting.default is not None, help=setting.help,
    )


def settings_options(declarations: Iterable[Setting]) -> Callable:
    """One click option per declared setting, in declaration order."""
    return apply_options([setting_option(setting) for setting in declarations])


def method_options(stage: str, default_text: str) -> Callable:
    """`--method` and one flag per method parameter, all from the registry's declarations.

    Parameter flags default to None ("not given"): the chosen method's own default applies,
    and a flag the chosen method does not declare is an error rather than silently ignored.
    """
    from kd.methods import format_default, method_names, stage_params

    options = [click.option(
        "--method", type=click.Choice(method_names(stage)), default=None,
        help=f"Training method (default: {default_text}). `kd methods` describes each and its parameters.",
    )]
    for declared in stage_params(stage).values():
        param = declared[0][1]
        if len({p.help for _, p in declared}) == 1:
            text = f"{', '.join(method for method, _ in declared)}: {param.help}"
        else:
            text = "; ".join(f"{method}: {p.help}" for method, p in declared)
        if param.type is bool:
            options.append(click.option(param.flag, is_flag=True, default=False, help=f"{text}."))
            continue
        defaults = ", ".join(f"{method} {format_default(p)}" for method, p in declared)
        kind = click.Choice(param.choices) if param.choices else param.type
        options.append(click.option(param.flag, type=kind, default=None, metavar=param.metavar, help=f"{text}. Default: {defaults}."))
    return apply_options(options)
