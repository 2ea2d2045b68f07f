"""Archives to hand to a person: an adapter folder, or the adapter merged into a standalone model.

    path = adapter_archive(adapter_folder("abc123"))           # <home>/exports/<name>-adapter.zip
    path, report = merged_archive(adapter_folder("abc123"))    # merges (verified by logits), then zips

Everything is written under `<LORA_STUDIO_HOME>/exports`, the one folder the web UI serves files
from. Archives are written under a temporary name and renamed into place, so a half-written zip
never looks finished; one newer than its adapter is reused instead of being built again.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from .adapters import METADATA_FILE, adapter_name, read_metadata
from .home import studio_home

# Weights barely compress and are large: store them as they are, deflate the small text files.
_STORED_SUFFIXES = (".safetensors", ".gguf", ".bin")


def exports_dir() -> Path:
    folder = studio_home() / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def adapter_archive(adapter_dir: str | Path) -> Path:
    """A zip of an adapter folder (weights, config, tokenizer, lora_studio.json)."""
    folder = Path(adapter_dir).expanduser().resolve()
    read_metadata(folder)  # only whole adapters are packed: a ModelError says what is missing
    dest = exports_dir() / f"{adapter_name(folder)}-adapter.zip"
    if not _is_fresh(dest, folder / METADATA_FILE):
        zip_folder(folder, dest, top=f"{adapter_name(folder)}-adapter")
    return dest


def merged_archive(adapter_dir: str | Path) -> tuple[Path, list[str]]:
    """Merge an adapter into its base (a standalone transformers model), zip it; returns (zip, report lines)."""
    from .tasks.registry import task_of

    folder = Path(adapter_dir).expanduser().resolve()
    read_metadata(folder)
    name = f"{adapter_name(folder)}-merged"
    dest, merged = exports_dir() / f"{name}.zip", exports_dir() / "merged" / name
    if _is_fresh(dest, folder / METADATA_FILE):
        return dest, [f"merged model archive already built: {dest.name}"]
    report = task_of(folder).merge(folder, merged, overwrite=True)
    zip_folder(merged, dest, top=name)
    return dest, report.lines()


def zip_folder(folder: Path, dest: Path, top: str) -> Path:
    """Zip `folder`'s files under the directory name `top`, atomically (temp file, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as archive:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                kind = zipfile.ZIP_STORED if path.suffix in _STORED_SUFFIXES else zipfile.ZIP_DEFLATED
                archive.write(path, f"{top}/{path.relative_to(folder)}", compress_type=kind)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def _is_fresh(archive: Path, source: Path) -> bool:
    return archive.is_file() and archive.stat().st_mtime >= source.stat().st_mtime
