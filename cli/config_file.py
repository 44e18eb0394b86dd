"""`--config FILE`: flag values from a YAML file or a previous run's config.json.

The file fills click's `default_map`, so a flag given on the command line always wins over
the file, and the file over the built-in defaults. A run's config.json records more than its
flags (class names, fingerprints, the resolved augmentation parameters); only what is a flag
of the command is taken from it, and where the run was written (`out`, `overwrite`,
`resume`) never is. A hand-written YAML file names flags only (with dashes or underscores);
anything else is a one-line error, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from kd.errors import one_line
from kd.training.settings import RUN_SETTINGS

# config.json keys that say where and how a run was written, not what it trains.
_RUN_LOCATION = tuple(setting.name for setting in RUN_SETTINGS if not setting.rerun)
# config.json records the augmentation parameters resolved, in this dict, not as flags.
_RESOLVED_AUGMENT = "augment_options"


def _read(path: Path) -> dict[str, Any]:
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        if kind == "JSON":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except OSError as error:
        raise click.BadParameter(f"cannot read {path}: {error.strerror or error}")
    except Exception as error:  # noqa: BLE001 - json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError
        raise click.BadParameter(f"{path} is not valid {kind}: {one_line(error, 200)}")
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} holds no mapping of flag names to values")
    return data


def _as_flag_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):  # config.json's "augment": ["crop", "flip"]
        return ",".join(str(item) for item in value)
    return value


def config_defaults(command: click.Command, path: Path, stage: str) -> dict[str, Any]:
    """The `default_map` for `command` from the file at `path` (a run's config.json or YAML)."""
    data = _read(path)
    params = {param.name: param for param in command.params if isinstance(param, click.Option) and param.name != "config"}
    is_run_config = "toolkit_version" in data and "stage" in data
    if is_run_config and data["stage"] != stage:
        raise click.BadParameter(
            f"{path} is the config of a {data['stage']} run; use it with "
            f"`kd {'train-teacher' if data['stage'] == 'teacher' else 'distill'} --config`"
        )
    values: dict[str, Any] = {}
    if is_run_config:
        for key, value in (data.get(_RESOLVED_AUGMENT) or {}).items():
            if key in params and value is not None:
                values[key] = value
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in params:
            if is_run_config:
                continue
            raise click.BadParameter(f"{path}: {key!r} is not a flag of this command (see --help)")
        if value is None or (is_run_config and name in _RUN_LOCATION):
            continue
        values[name] = _as_flag_value(value)
    return values


def config_option(stage: str) -> Callable:
    """The `--config FILE` option for a training command of `stage` ("teacher" or "student")."""

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is None:
            return
        try:
            ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx.command, Path(value), stage)}
        except click.BadParameter as error:
            error.param = param
            raise

    return click.option(
        "--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False, callback=load,
        help="Take flag values from this file: YAML (flag names as keys) or a previous run's config.json (re-makes "
        "that run; give a new --out). Flags on the command line override the file.",
    )
