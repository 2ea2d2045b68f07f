"""The adapters of runs on object storage, downloaded once into the studio home.

    folder = adapter_cache.fetch(run.folder)   # <home>/cache/remote-adapters/<key>/adapter

`runs.adapter_folder("NAME")` calls this for a run whose folder is a storage face (storage.py), so
`chat`, `serve`, `eval` and `merge` take the run's name as for any run. One listing of the bucket's
adapter/ says whether the cached copy is current: its files' sizes and modification times are the
version. A changed remote, or a cached copy that no longer matches what was downloaded (its
sha256s), is fetched again. A download goes to a temporary folder, is checked like any adapter
folder (adapters.read_metadata: the metadata, the PEFT config, a complete safetensors file) and
only then renamed into place; the loaders then make their usual checks (base hash, finite weights).
With the bucket out of reach, an intact cached copy is used, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from .errors import ModelError
from .files import atomic_write_text, file_sha256, move_into_place, temp_folder
from .home import studio_home
from .storage import Remote, RemoteFile, StorageError, remote_of

log = logging.getLogger(__name__)

ADAPTER = "adapter"
METADATA_FILE = "lora_studio.json"  # adapters.METADATA_FILE (not imported: it loads torch)
SOURCE_FILE = "source.json"  # beside the cached adapter: the version it is, and its files' sha256


def cache_folder(uri: str) -> Path:
    """Where the adapter of the run at `uri` is kept: one folder per run URI."""
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return studio_home() / "cache" / "remote-adapters" / key


def cached(face: Path) -> Path | None:
    """The cached adapter of a run on object storage, if one was downloaded (unchecked); else None."""
    uri = remote_of(face)
    folder = cache_folder(uri) / ADAPTER if uri else None
    return folder if folder is not None and (folder / METADATA_FILE).is_file() else None


def fetch(face: Path) -> Path:
    """The adapter of the run whose face is `face`, from the cache, downloading it when needed."""
    uri = remote_of(face)
    if uri is None:
        raise ModelError(f"{face} is not the folder of a run on object storage")
    home = cache_folder(uri)
    dest, source = home / ADAPTER, home / SOURCE_FILE
    try:
        files = Remote(uri).files(ADAPTER)
    except StorageError as e:
        if _intact(dest, source):
            log.warning("%s; using the adapter downloaded before (%s)", e, dest)
            return dest
        raise
    if f"{ADAPTER}/{METADATA_FILE}" not in files:
        raise ModelError(
            f"{uri}/{ADAPTER} holds no complete adapter (no {METADATA_FILE}); `lora-studio jobs show` "
            "says how its run ended"
        )
    version = _version(files)
    if _intact(dest, source, version):
        return dest
    if dest.exists():
        log.warning("the cached adapter %s is damaged or out of date: downloading it again", dest)
    _download(Remote(uri), files, dest, source, version)
    return dest


def _version(files: dict[str, RemoteFile]) -> str:
    listed = sorted((name, f.size, f.mtime_ns) for name, f in files.items())
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def _intact(dest: Path, source: Path, version: str | None = None) -> bool:
    """Whether the cached copy is the one downloaded (of `version`, when given), byte for byte."""
    try:
        recorded = json.loads(source.read_text())
        sums = recorded["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if version is not None and recorded.get("version") != version:
        return False
    on_disk = (
        {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} if dest.is_dir() else set()
    )
    return on_disk == set(sums) and all(file_sha256(dest / n) == s for n, s in sums.items())


def _download(remote: Remote, files: dict[str, RemoteFile], dest: Path, source: Path, version: str) -> None:
    from .adapters import read_metadata  # loads torch: only when an adapter is downloaded

    log.info("downloading the adapter %s/%s into %s", remote.uri, ADAPTER, dest)
    tmp = temp_folder(dest)
    try:
        for name in files:
            remote.download(name, tmp / name[len(ADAPTER) + 1 :])
        try:
            read_metadata(tmp)
        except ModelError as e:  # said of the bucket's copy, not of our temporary folder
            raise ModelError(str(e).replace(str(tmp), f"{remote.uri}/{ADAPTER}")) from None
        sums = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in tmp.rglob("*") if p.is_file()}
        source.unlink(missing_ok=True)  # no record of a version while the folder is replaced
        move_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(source, json.dumps({"uri": remote.uri, "version": version, "sha256": sums}, indent=2))
