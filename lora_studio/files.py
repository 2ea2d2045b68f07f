"""Writing files so that a crash never leaves a half-written one that looks complete."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name, then rename it over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def move_into_place(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary folder to `dest`, replacing an older one if there is one."""
    if dest.exists():  # move the old one aside first, then drop it
        old = dest.with_name(f".{dest.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
