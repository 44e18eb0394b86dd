"""The methods' registry: one line per method, name -> "module:Class".

Adding a method is one new file in this package (a `Method` subclass, see `base.py`) and one
line here. Everything else (command-line flags, config.json keys, `--resume` checks,
the method table in docs/methods.md, `kd methods`) is derived from the classes' declarations.
"""

from __future__ import annotations

import importlib
from typing import Any

from kd.errors import KDError
from kd.methods.base import STAGES, EpochContext, ExportInfo, Method, Param, Setup, StepContext

REGISTRY: dict[str, str] = {
    "onehot": "kd.methods.onehot:OneHot",
    "ls": "kd.methods.ls:LabelSmoothing",
    "lspp": "kd.methods.lspp:LSPP",
    "ols": "kd.methods.ols:OLS",
    "tfkd": "kd.methods.tfkd:TeacherFreeKD",
    "zipf": "kd.methods.zipf:ZipfLS",
    "focal": "kd.methods.focal:Focal",
    "flsd": "kd.methods.flsd:FLSD53",
    "mbls": "kd.methods.mbls:MarginLS",
    "proxy": "kd.methods.proxy:Proxy",
    "kd": "kd.methods.hinton:HintonKD",
    "dkd": "kd.methods.dkd:DecoupledKD",
    "dist": "kd.methods.dist:DIST",
}

__all__ = [
    "REGISTRY", "STAGES", "EpochContext", "ExportInfo", "Method", "Param", "Setup", "StepContext",
    "format_default", "get_method", "method_names", "soft_target_methods", "stage_params", "all_param_names", "resolve_params", "build_method", "methods_markdown",
]


def get_method(name: str) -> type[Method]:
    """The class registered under `name`; a one-line `KDError` for an unknown name."""
    if name not in REGISTRY:
        raise KDError(f"unknown --method {name!r}; choose one of {', '.join(REGISTRY)}")
    module, _, attribute = REGISTRY[name].partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if cls.name != name:
        raise RuntimeError(f"registry entry {name!r} points at a method named {cls.name!r}")
    return cls


_ANY = object()


def method_names(stage: str, needs: Any = _ANY) -> list[str]:
    """Names of the methods serving `stage` (and, if given, needing `needs`), in registry order."""
    return [
        name for name in REGISTRY
        if stage in get_method(name).stages and (needs is _ANY or get_method(name).needs == needs)
    ]


def soft_target_methods() -> list[str]:
    """Names of the methods that take label distributions (Mixup/CutMix) as targets."""
    return [name for name in REGISTRY if get_method(name).soft_targets]


def stage_params(stage: str) -> dict[str, list[tuple[str, Param]]]:
    """Every parameter of the methods serving `stage`, by name: [(method, its declaration), ...].

    Methods may share a parameter (kd and tfkd both have `temperature`); they must then agree on
    its type, because it is one command-line flag.
    """
    found: dict[str, list[tuple[str, Param]]] = {}
    for name in method_names(stage):
        for param in get_method(name).params:
            declared = found.setdefault(param.name, [])
            if declared and declared[0][1].type is not param.type:
                raise RuntimeError(f"parameter {param.name!r} has type {param.type} in {name}, {declared[0][1].type} in {declared[0][0]}")
            declared.append((name, param))
    return found


def all_param_names() -> tuple[str, ...]:
    """Every method parameter's name, over all stages (the method-dependent keys of config.json)."""
    return tuple(dict.fromkeys(name for stage in STAGES for name in stage_params(stage)))


def resolve_params(cls: type[Method], given: dict[str, Any]) -> dict[str, Any]:
    """The method's parameter values: `given` (None or False means not given) over the declared defaults.

    A parameter given for a method that does not declare it is a one-line error naming the
    methods that do, so a flag is never silently ignored.
    """
    declared = {param.name: param for param in cls.params}
    for name, value in given.items():
        if value is None or value is False or name in declared:
            continue
        flag = "--" + name.replace("_", "-")
        users = [m for m in REGISTRY if any(p.name == name for p in get_method(m).params)]
        raise KDError(f"{flag} does not apply to --method {cls.name} (it is a parameter of {', '.join(users)})")
    params = {}
    for name, param in declared.items():
        value = given.get(name)
        params[name] = param.default if value is None else value
        param.check(params[name])
    cls.check_params(params)
    return params


def build_method(name: str, num_classes: int, class_names: tuple[str, ...] | None = None, **given: Any) -> Method:
    """A method instance for library use and tests: `build_method("lspp", 10, alpha=0.2)`."""
    cls = get_method(name)
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    cmatrix, teacher = given.pop("cmatrix", None), given.pop("teacher", None)
    return cls(Setup(num_classes, names, resolve_params(cls, given), cmatrix=cmatrix, teacher=teacher))


def format_default(value: Any) -> str:
    """What --help and the method table say of a parameter's default (a `Param` says it itself with `default_text`)."""
    if isinstance(value, Param):
        return value.default_text or format_default(value.default)
    if value is None:
        return "from the file"
    if isinstance(value, bool):
        return "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def methods_markdown() -> str:
    """The method table of docs/methods.md, made from the registry."""
    lines = ["| method | stage | what | parameters (defaults) | Mixup/CutMix |", "|---|---|---|---|---|"]
    for name in REGISTRY:
        cls = get_method(name)
        stages = " and ".join(cls.stages)
        if cls.needs is not None:
            stages += f" (needs {'--teacher RUN_DIR, --teacher-model or --soft-labels FILE' if cls.needs == 'teacher' else '--proxy FILE'})"
        params = ", ".join(f"`{p.flag}` {format_default(p)}" for p in cls.params) or "none"
        lines.append(f"| `{name}` | {stages} | {cls.summary} | {params} | {'yes' if cls.soft_targets else 'no'} |")
    return "\n".join(lines) + "\n"
