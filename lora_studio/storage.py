"""Run folders on object storage (s3://, gs://): the one place storage URIs are handled.

    lora-studio jobs submit RECIPE --cluster ray --storage s3://bucket/lora-runs

pyarrow's filesystem layer does the talking (pyarrow comes with `datasets`, and Ray Train uses
it for its own storage), so credentials and endpoints come from the standard places: an instance
role, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION, AWS_ENDPOINT_URL for MinIO or a
test server; Google's application default credentials for gs://.

A run on object storage lives in three places:
- the bucket: <uri>/runs/<name>-<id>/ holds the run folder as training writes it (config.yaml,
  status.json, metrics.jsonl, train.log, checkpoints/, adapter/ with lora_studio.json);
- the node: the job process trains in a local scratch copy and mirrors it up (run_mirror.py);
- this machine: the run's *face*, <home>/storage/<scheme>/<bucket>/<prefix>/runs/<name>-<id>, a
  local folder the job store and the run index point at. It holds `storage.json` (where the run
  lives) and copies of the small files (status, metrics, config, each whole checkpoint's
  trainer_state.json), refreshed from the bucket when read until the run has ended. So `runs`,
  `jobs list` and `jobs show` read it as any run folder, and `chat NAME` & co. get the adapter
  through a download-once cache (adapter_cache.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError, LoraStudioError
from .files import atomic_write_bytes, atomic_write_text
from .home import studio_home
from .run_folder import CHECKPOINTS, METRICS_FILE

log = logging.getLogger(__name__)

SCHEMES = ("s3", "gs")
SCRATCH_FILE = ".mirrored-to"  # in a node's scratch copy of a run (run_mirror.py): the run's URI
LINK_FILE = "storage.json"  # in a run's face: {"uri": "s3://bucket/prefix/runs/<name>-<id>"}
SMALL_FILES = ("status.json", METRICS_FILE, "config.yaml", "data_report.json")  # what a face copies
CHECKPOINT_MARKER = "trainer_state.json"  # written last into a checkpoint (run_folder.py)
REFRESH_SECONDS = 2.0  # a face read more often than this is read as it is
_FINISHED = ("succeeded", "failed", "cancelled")


class StorageError(LoraStudioError):
    """Object storage cannot be reached or read (credentials, endpoint, a missing bucket)."""


def is_uri(text: str | Path | None) -> bool:
    return text is not None and "://" in str(text)


def check_uri(text: str) -> str:
    """A storage URI as given, checked: s3:// or gs://, a bucket, no query string. No trailing '/'."""
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(
            f"--storage {text}: expected a folder every node sees, or s3://BUCKET[/PREFIX] or "
            "gs://BUCKET[/PREFIX] (endpoints and credentials come from the environment, e.g. "
            "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID)"
        )
    return text.rstrip("/")


# --- the face: this machine's folder for a run that lives in a bucket -------------------------------
def face_root(uri: str) -> Path:
    """The local folder standing for storage `uri`: <home>/storage/<scheme>/<bucket>/<prefix>."""
    parts = urlsplit(check_uri(uri))
    folder = studio_home() / "storage" / parts.scheme / parts.netloc / parts.path.strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def uri_of_face(folder: Path) -> str | None:
    """The storage URI a folder under a face_root stands for (None: an ordinary folder)."""
    try:
        relative = Path(folder).resolve().relative_to((studio_home() / "storage").resolve())
    except ValueError:
        return None
    scheme, *rest = relative.parts or ("",)
    return f"{scheme}://{'/'.join(rest)}" if scheme in SCHEMES and rest else None


def link(folder: Path, uri: str) -> None:
    """Make `folder` the face of the run at `uri`; its copies of the run's files are refetched."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        (folder / name).unlink(missing_ok=True)  # a resumed run: its ended status is not its last word
    _refreshed.pop(Path(folder), None)
    atomic_write_text(folder / LINK_FILE, json.dumps({"uri": uri}))


def remote_of(folder: Path) -> str | None:
    """Where the run whose face is `folder` lives; None for an ordinary run folder."""
    try:
        uri = json.loads((Path(folder) / LINK_FILE).read_text())["uri"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return uri if isinstance(uri, str) and is_uri(uri) else None


def write_through(folder: Path, name: str) -> None:
    """A file this machine changed in a run's face (the job store writing its state), copied up to
    the bucket, so the run reads the same from anywhere (no-op for an ordinary folder)."""
    uri = remote_of(folder)
    if uri is None:
        return
    try:
        Remote(uri).upload(Path(folder) / name, name)
    except (StorageError, OSError) as e:
        log.warning("cannot copy %s of run %s up to %s: %s", name, Path(folder).name, uri, e)


def is_scratch(folder: Path) -> bool:
    """Whether `folder` is a node's scratch copy of a run on object storage (not to be indexed)."""
    return (Path(folder) / SCRATCH_FILE).is_file()


_refreshed: dict[Path, float] = {}


def refresh(folder: Path, force: bool = False) -> None:
    """Copy a run's small files from its bucket into its face (no-op for an ordinary folder).

    Stops once the copied status says the run ended (until `link` starts a new attempt); `force`
    reads the bucket even so, and even if it was read a moment ago (the cluster said it ended). A bucket
    that cannot be read leaves the copies as they are, with a warning: `jobs list` keeps working.
    """
    folder = Path(folder)
    uri = remote_of(folder)
    if uri is None:
        return
    if not force and (
        time.monotonic() - _refreshed.get(folder, -1e9) < REFRESH_SECONDS
        or _copied_state(folder) in _FINISHED
    ):
        return
    _refreshed[folder] = time.monotonic()
    try:
        remote = Remote(uri)
        files = remote.files()
        for name in SMALL_FILES:
            if name in files:
                _copy_if_changed(remote, name, files[name], folder / name)
        _copy_checkpoint_markers(remote, files, folder)
    except (StorageError, OSError) as e:
        log.warning("cannot refresh run %s from %s: %s", folder.name, uri, e)


def _copied_state(folder: Path) -> str | None:
    try:
        return json.loads((folder / "status.json").read_text()).get("state")
    except (OSError, ValueError, AttributeError):
        return None


def _copy_if_changed(remote: Remote, name: str, info: RemoteFile, dest: Path) -> None:
    with_time = (
        dest.is_file() and dest.stat().st_size == info.size and dest.stat().st_mtime_ns == info.mtime_ns
    )
    if not with_time:
        atomic_write_bytes(dest, remote.read_bytes(name), durable=False)
        os.utime(dest, ns=(info.mtime_ns, info.mtime_ns))


def _copy_checkpoint_markers(remote: Remote, files: dict[str, RemoteFile], folder: Path) -> None:
    """The face's checkpoints/: each whole checkpoint's marker only (run_folder reads which are whole)."""
    marked = {
        n.split("/")[1]
        for n in files
        if n.startswith(f"{CHECKPOINTS}/") and n.endswith(f"/{CHECKPOINT_MARKER}")
    }
    local = folder / CHECKPOINTS
    for name in marked:
        if not (local / name / CHECKPOINT_MARKER).is_file():
            (local / name).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(
                local / name / CHECKPOINT_MARKER,
                remote.read_bytes(f"{CHECKPOINTS}/{name}/{CHECKPOINT_MARKER}"),
                durable=False,
            )
    for old in [p for p in local.iterdir() if p.name not in marked] if local.is_dir() else []:
        (old / CHECKPOINT_MARKER).unlink(missing_ok=True)  # deleted from the bucket (save_total_limit)
        with contextlib.suppress(OSError):
            old.rmdir()


# --- a folder in a bucket ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    size: int
    mtime_ns: int


class Remote:
    """A folder on object storage, by URI: read, write, list, upload and download its files.

    Names are relative to the folder ("checkpoints/checkpoint-4/trainer_state.json"). An object
    appears whole or not at all (S3 and GCS writes are atomic), which is what the mirror relies on.
    """

    def __init__(self, uri: str):
        self.uri = check_uri(uri)
        self.fs, self.root = _filesystem(self.uri)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def files(self, under: str = "") -> dict[str, RemoteFile]:
        """Every file under `under` (recursively), by name relative to this folder."""
        from pyarrow import fs

        selector = fs.FileSelector(self._path(under), recursive=True, allow_not_found=True)
        infos = self._call("list", under, self.fs.get_file_info, selector)
        start = len(self.root) + 1
        return {
            i.path[start:]: RemoteFile(i.size or 0, i.mtime_ns or 0)
            for i in infos
            if i.type == fs.FileType.File
        }

    def exists(self, name: str) -> bool:
        from pyarrow import fs

        return self._call("look up", name, self.fs.get_file_info, self._path(name)).type == fs.FileType.File

    def read_bytes(self, name: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self._path(name)) as f:
                return f.read()

        return self._call("read", name, read)

    def write_bytes(self, name: str, data: bytes) -> None:
        def write() -> None:
            with self.fs.open_output_stream(self._path(name)) as f:
                f.write(data)

        self._call("write", name, write)

    def upload(self, local: Path, name: str) -> None:
        from pyarrow import fs

        self._call(
            "upload", name, fs.copy_files, str(local), self._path(name), destination_filesystem=self.fs
        )

    def download(self, name: str, local: Path) -> None:
        from pyarrow import fs

        local.parent.mkdir(parents=True, exist_ok=True)
        self._call("download", name, fs.copy_files, self._path(name), str(local), source_filesystem=self.fs)

    def delete(self, name: str) -> None:
        self._call("delete", name, self.fs.delete_file, self._path(name))

    def delete_folder(self, name: str) -> None:
        """Every object under `name` (pyarrow's delete_file leaves a folder marker; this does not)."""
        self._call("delete", name, self.fs.delete_dir, self._path(name))

    def _call(self, verb: str, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(*args), its OSError (network, permission, missing) said in one line."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except OSError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise StorageError(
                f"cannot {verb} {self.uri}/{name}: {first}; check the storage's credentials and "
                "endpoint (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS)"
            ) from None


_filesystems: dict[str, Any] = {}


def _filesystem(uri: str) -> tuple[Any, str]:
    """pyarrow's filesystem for a URI (one per bucket and process) and the path inside it."""
    from pyarrow import fs

    parts = urlsplit(uri)
    key = f"{parts.scheme}://{parts.netloc}"
    if key not in _filesystems:
        try:
            _filesystems[key], _ = fs.FileSystem.from_uri(key)
        except (OSError, ValueError) as e:
            raise StorageError(f"cannot open {key}: {e}") from None
    return _filesystems[key], f"{parts.netloc}{parts.path}".rstrip("/")
