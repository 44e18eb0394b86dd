"""The layering the README states, checked from the imports of every module.

* `kd/` (the library) knows nothing of the stages or the command line;
* `teachers/` and `students/` use `kd/` and never each other;
* `cli/` may use all of them, and nothing uses `cli/`;
* no import circles (any import that runs, at module level or inside a function).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

# Folder -> the name its modules are imported by (setup.cfg's package_dir).
PACKAGES = {"kd": "kd", "cli": "lspp_kd.cli", "teachers": "lspp_kd.teachers", "students": "lspp_kd.students"}


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for folder in PACKAGES for path in sorted((ROOT / folder).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from package import module` counts as the module)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    for block in ast.walk(tree):  # imports for type checkers only never run
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known}
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def layer(module: str) -> str:
    return "kd" if module == "kd" or module.startswith("kd.") else module.split(".")[1]


ALLOWED = {
    "kd": {"kd"},
    "teachers": {"kd", "teachers"},
    "students": {"kd", "students"},
    "cli": {"kd", "teachers", "students", "cli"},
}


def test_each_layer_imports_only_what_the_readme_allows():
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) not in ALLOWED[layer(module)]
    ]
    assert not wrong, wrong


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_there_are_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert layer("lspp_kd.students.distill") == "students" and "students" not in ALLOWED["teachers"]
    graph = import_graph()
    assert "kd.training.run" in graph["lspp_kd.teachers.train"]  # the graph sees real imports


def test_every_package_folder_is_installed():
    """setup.cfg lists packages by hand (package_dir puts cli/ and the stages under lspp_kd)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    folders = {module_name(path.parent / "__init__.py") for folder in PACKAGES for path in (ROOT / folder).rglob("__init__.py")}
    assert listed == folders
