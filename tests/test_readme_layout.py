"""README's Layout paragraph names every module of the library, so a newcomer can find each one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_studio"


def layout_text() -> str:
    """From `Layout:` to the paragraph that starts with `ui/`."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Layout: `lora_studio/`")
    return readme[start : readme.index("\n`ui/`", start)]


def test_layout_names_every_module_and_package():
    named = set(re.findall(r"`([^`]+)`", layout_text()))
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if path.stem in ("__init__", "__main__") or relative.parts[0] == "cli":
            continue  # cli/: one module per command group, named by `lora-studio --help`
        module = relative.with_suffix("").as_posix()
        if module not in named and path.stem not in named:
            missing.append(module)
    packages = [p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")]
    missing += [f"{name}/" for name in packages if f"{name}/" not in named]
    assert not missing, f"README's Layout paragraph does not name: {', '.join(missing)}"
