"""Uploaded data files: checked, renamed safely and kept under the studio's own folder.

A browser (or API client) chooses the file name, so it is never trusted: only its last path
component survives, reduced to letters, digits, `-`, `_` and `.`, and the stored name also
carries a content hash so two uploads never overwrite each other and a run that names a stored
file always sees the bytes it was started with. Nothing here imports gradio.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from lora_studio.data import SUFFIXES
from lora_studio.errors import DataError
from lora_studio.files import file_sha256
from lora_studio.home import studio_home

DEFAULT_MAX_UPLOAD_MB = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def uploads_dir() -> Path:
    folder = studio_home() / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_client_name(name: str) -> None:
    """Refuse a client-sent name with folder parts: browsers send plain names, so this is an attack."""
    if re.search(r"[\\/\x00]", name) or name.strip() in (".", ".."):
        raise DataError(
            f"the file name {name!r} has folder parts ('/', '\\' or '..'); upload a file with a "
            "plain name such as train.jsonl"
        )


def safe_name(name: str) -> str:
    """A file name that cannot leave its folder: no separators, no leading dots, no odd bytes."""
    base = re.split(r"[\\/]", name)[-1]  # Windows and POSIX separators alike
    base = _UNSAFE.sub("_", base).strip("._") or "upload"
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    stem = stem[:80] or "upload"
    return f"{stem}.{suffix.lower()}" if suffix else stem


def store_upload(
    src: str | Path, original_name: str | None = None, max_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20
) -> Path:
    """Check an uploaded file (type, size) and copy it into the uploads folder; return the copy.

    `src` is where the web server put the upload; `original_name` is the name the client sent
    (defaults to src's name). Raises DataError with what was given and what is accepted.
    """
    src = Path(src)
    check_client_name(original_name or src.name)
    name = safe_name(original_name or src.name)
    suffix = Path(name).suffix
    if suffix not in SUFFIXES:
        raise DataError(
            f"{name!r} is not a data file this studio reads (got type {suffix or 'none'!r}); "
            f"upload one of {', '.join(SUFFIXES)}"
        )
    size = src.stat().st_size
    if size > max_bytes:
        raise DataError(
            f"{name!r} is {size / 2**20:.1f} MB, over the upload limit of {max_bytes / 2**20:.0f} MB; "
            "upload a smaller file, or restart the UI with a larger --max-upload-mb"
        )
    if size == 0:
        raise DataError(f"{name!r} is empty: it has no rows")
    digest = file_sha256(src)[:10]
    dest = uploads_dir() / f"{Path(name).stem}-{digest}{suffix}"
    if not dest.is_file():  # same bytes, same name: already stored
        _copy_atomic(src, dest)
    return dest


def list_uploads() -> list[Path]:
    """Stored uploads, newest first."""
    folder = studio_home() / "uploads"  # listing creates nothing: building the page has no side effects
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES] if folder.is_dir() else []
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def _copy_atomic(src: Path, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
