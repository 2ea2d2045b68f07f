"""Every `lora-studio ...` command the project shows a reader, found where a reader finds it.

Sources: README.md and docs/*.md (commands in fenced code blocks, and `lora-studio ...` mentions in
inline code), the comment headers of recipes/*.yaml, the Makefile's recipes and comments, and the
examples' Python files (inline mentions in their docstrings and comments). A command shown in a
code block, a recipe header or the Makefile is complete: it must parse as written. An inline
mention may leave out required arguments ("`lora-studio eval` answers...") but what it does show
must still be true.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `lora-studio` at the start of a shell line, after optional VAR=value assignments.
SHELL_COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*lora-studio(?=\s|$)(.*)$")
INLINE = re.compile(r"`lora-studio(?=[\s`])([^`]*)`")
MAKEFILE_COMMAND = re.compile(r"(?:\$\(VENV\)/bin/lora-studio|-m lora_studio\.cli)(?=\s|$)(.*)$")
# `make ui   # or: lora-studio ui [--port 7860]`: a command offered in a code block's comment.
COMMENTED = re.compile(r"#[^`]*?\blora-studio(?=\s)(.*)$")
RECIPE_HEADER = re.compile(r"^#\s+lora-studio(?=\s|$)(.*)$")


@dataclass(frozen=True)
class Shown:
    """One command as shown: where, its words after `lora-studio`, and whether it is complete."""

    where: str
    text: str
    complete: bool

    @property
    def argv(self) -> list[str]:
        """The words after `lora-studio`, with a synopsis' [optional] brackets and `...` removed."""
        words = shlex.split(self.text, comments=True)
        words = [w[1:] if w.startswith("[") else w for w in words]
        words = [w[:-1] if w.endswith("]") else w for w in words]
        return [w for w in words if w and w != "..."]


def shown_commands(root: Path = ROOT) -> list[Shown]:
    found: list[Shown] = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        found += markdown_commands(path, root)
    for path in sorted((root / "recipes").glob("*.yaml")):
        found += _matches(path, root, RECIPE_HEADER, complete=True, header_only=True)
    found += _matches(root / "Makefile", root, MAKEFILE_COMMAND, complete=True)
    found += _matches(root / "Makefile", root, INLINE, complete=False)
    for path in sorted((root / "examples").glob("*/*.py")):
        found += _matches(path, root, INLINE, complete=False)
    return found


def markdown_commands(path: Path, root: Path = ROOT) -> list[Shown]:
    """Shell lines of fenced code blocks (joined across `\\` line ends) and inline mentions."""
    name, found = path.relative_to(root), []
    fenced, pending, start, prose = False, "", 0, []
    for number, line in enumerate([*path.read_text().splitlines(), ""], 1):
        if line.lstrip().startswith("```") or (not fenced and not line.strip()):
            found += _mentions(prose, name)  # a paragraph ends: its spans may cross lines
            prose = []
            fenced = fenced != line.lstrip().startswith("```")
            continue
        if not fenced:
            prose.append((number, line))
            continue
        start = start if pending else number
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        match = SHELL_COMMAND.match(pending.strip()) or COMMENTED.search(pending)
        if match:
            found.append(Shown(f"{name}:{start}", match.group(1), complete=True))
        pending = ""
    return found


def _mentions(prose: list[tuple[int, str]], name: Path) -> list[Shown]:
    if not prose:
        return []
    text = "\n".join(line for _, line in prose)
    return [
        Shown(f"{name}:{prose[0][0] + text.count(chr(10), 0, m.start())}", m.group(1), complete=False)
        for m in INLINE.finditer(text)
    ]


def _matches(
    path: Path, root: Path, pattern: re.Pattern[str], *, complete: bool, header_only: bool = False
) -> list[Shown]:
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if header_only and not line.startswith("#"):
            break  # a recipe's header ends at its first setting
        where = f"{path.relative_to(root)}:{number}"
        found += [Shown(where, m.group(1), complete) for m in pattern.finditer(line.strip())]
    return found
