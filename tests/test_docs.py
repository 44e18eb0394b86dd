"""The README and docs/*.md against the toolkit: every flag they quote for a `kd` command exists in
that command's `--help`, and every relative link and image they use points to an existing file
(and, for a `#anchor`, to a heading of that file)."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import KD, ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# `kd` followed by a command: `kd train-teacher`, `kd cmatrix show`, `kd --version`, ...
COMMAND = re.compile(r"(?<![\w./-])kd((?:\s+(?:train-teacher|distill|methods|compare|plot|cmatrix(?:\s+[a-z][a-z-]*)?))?)(?![\w-])")
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
# Flags the docs quote on purpose that no command has: the "Adding a method" example's own
# parameter and the "Adding a run setting" example's flag.
IMAGINARY = {("train-teacher", "--my-param"), ("train-teacher", "--warmup-epochs"), ("distill", "--warmup-epochs")}
INLINE_CODE = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")  # a code span may wrap, but not across a paragraph
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_and_prose(text: str) -> tuple[list[str], list[str]]:
    """The lines of code blocks, fenced or indented by four spaces after a blank line (backslash
    continuations joined), and the other lines."""
    code, prose, fenced, indented, blank = [], [], False, False, True
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():  # a trailing backslash continues the line
        indented = not fenced and line.startswith(("    ", "\t")) and (blank or indented)
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or indented:
            code.append(line)
        else:
            prose.append(line)
        blank = not line.strip()
    return code, prose


def commands_in(snippet: str) -> list[tuple[str, list[str]]]:
    """Each `kd COMMAND ... --flag ...` in a command line or code span: (command, its flags). A
    command runs to the next `kd`, a shell comment, a pipe or a `;`."""
    found = []
    matches = list(COMMAND.finditer(snippet))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(snippet)
        rest = re.split(r"\s#|\s\||;|&&", snippet[match.end():end], maxsplit=1)[0]
        if not match.group(1) and not re.match(r"\s+--", rest):
            continue  # `kd` alone is a command only as in `kd --version`, not in `from kd import ...` or `kd/`
        found.append((" ".join(match.group(1).split()), FLAG.findall(rest)))
    return found


def quoted_commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """(where, command, flags) for every `kd` command in the file's code blocks and code spans, and
    for the flag tables right under a heading that names one command (the first column's flags)."""
    text = path.read_text()
    code, prose = code_and_prose(text)
    found = [(f"{relative(path)}: {line.strip()}", command, flags)
             for line in code for command, flags in commands_in(line)]
    for span in INLINE_CODE.findall("\n".join(prose)):
        found += [(f"{relative(path)}: `{span}`", command, flags) for command, flags in commands_in(span)]
    heading_command, flag_table = None, False
    for line in prose:
        if line.startswith("#"):
            named = [command for span in INLINE_CODE.findall(line) for command, _ in commands_in(span)]
            heading_command = named[0] if len(named) == 1 else None
        elif not line.startswith("|"):
            flag_table = False
        elif line.split("|")[1].strip() == "flag":  # a table of flags: | flag | ... | meaning |
            flag_table = True
        elif heading_command is not None and flag_table and not line.startswith("|---"):
            first = line.split("|")[1]
            flags = [flag for span in INLINE_CODE.findall(first) if span.startswith("--") for flag in FLAG.findall(span)]
            found.append((f"{relative(path)}: flag table of `kd {heading_command}`: {first.strip()}", heading_command, flags))
    return found


@functools.cache
def help_flags(command: str) -> frozenset[str]:
    """The flags `kd COMMAND --help` declares (from its option lines, not from the descriptions)."""
    result = subprocess.run([KD, *command.split(), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, f"kd {command} --help failed: {result.stderr[-1000:]}"
    flags = set()
    for line in result.stdout.splitlines():
        declaration = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if declaration:
            flags.update(FLAG.findall(declaration.group(1)))
    assert "--help" in flags, result.stdout
    return frozenset(flags)


def test_the_docs_are_found():
    names = {path.name for path in DOCUMENTS}
    assert {"README.md", "commands.md", "methods.md", "results.md", "scaling.md"} <= names
    quoted = [(command, flag) for path in DOCUMENTS for _, command, flags in quoted_commands(path) for flag in flags]
    assert {"train-teacher", "distill", "compare", "plot", "cmatrix show", "cmatrix card"} <= {command for command, _ in quoted}
    # the multi-line command, a wrapped code span, and the flag tables are read
    assert {("distill", "--teacher-weights"), ("cmatrix from-teacher", "--teacher-model"),
            ("train-teacher", "--my-param"), ("train-teacher", "--no-channels-last"), ("distill", "--remap-by-name")} <= set(quoted)


def test_every_quoted_flag_of_a_kd_command_is_in_its_help():
    unknown = []
    for path in DOCUMENTS:
        for where, command, flags in quoted_commands(path):
            if not flags:
                continue
            known = help_flags(command)
            unknown += [f"{where}\n    kd {command}: no {flag}" for flag in flags
                        if flag not in known and (command, flag) not in IMAGINARY]
    assert not unknown, "flags the docs quote that the command does not have:\n" + "\n".join(unknown)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The `#anchor`s of a markdown file's headings (a repeated heading gets -1, -2, ...)."""
    _, prose = code_and_prose(path.read_text())
    counts: dict[str, int] = {}
    found = set()
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            base = slug(match.group(1))
            found.add(base if base not in counts else f"{base}-{counts[base]}")
            counts[base] = counts.get(base, 0) + 1
    return found


@pytest.mark.parametrize("path", DOCUMENTS, ids=relative)
def test_relative_links_and_images_point_to_existing_files(path):
    _, prose = code_and_prose(path.read_text())
    broken = []
    for line in prose:
        line = INLINE_CODE.sub("", line)
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{target}: no {resolved}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{target}: no heading #{anchor} in {relative(resolved)}")
    assert not broken, f"{relative(path)}:\n" + "\n".join(broken)
