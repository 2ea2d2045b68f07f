"""Writing files and folders so that a crash never leaves a half-written one that looks complete,
and never loses the old version while the new one is not yet in place.

Files: `atomic_write_text` writes a uniquely named temporary file next to the target, fsyncs it,
renames it over the target and fsyncs the folder (so the rename survives a power cut too).

Folders are built in `temp_folder(dest)` and put in place by `move_into_place(tmp, dest)`, which
replaces an existing `dest` in three steps: rename `dest` aside (to `aside_path(dest)`), rename
the new folder in, delete the aside copy. A crash between the first two leaves the old version
aside and no `dest`; `settle_folder(dest)` (run by the next writer and by readers of the folder)
renames it back, and removes the temporary folders of writers that died.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_UMASK = os.umask(0)  # read once (setting it is the only way to read it), then put back
os.umask(_UMASK)


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    """Write a UTF-8 text file under a temporary name, then rename it over the old one."""
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write a file durably: readers see the old content or the new one, never a part of it.

    `durable=False` skips the fsyncs (still atomic for readers, not across a power cut): for
    frequent, disposable writes such as a progress step, which must not hold a lock for long.
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private; keep the mode a plain write would give
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make renames and new names in `folder` durable (a no-op where the filesystem cannot)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(Path(root))


# --- folders -----------------------------------------------------------------------------------
def aside_path(dest: Path) -> Path:
    """Where `move_into_place` keeps the old `dest` while it renames the new one in."""
    return dest.with_name(f".{dest.name}.old")


def temp_folder(dest: Path) -> Path:
    """A new empty folder next to `dest` to build its replacement in (same filesystem: a rename moves it).

    Its name holds this process's id, so `settle_folder` can tell a dead writer's leftovers.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=dest.parent))
    tmp.chmod(0o777 & ~_UMASK)
    return tmp


def move_into_place(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary folder to `dest`, replacing an older one if there is one.

    At every moment either `dest` or its aside copy holds a complete version (see the module doc).
    """
    settle_folder(dest)  # an earlier replacement cut short: its aside copy is the current version
    fsync_tree(tmp)  # the new files are on disk before any name points at them
    aside = aside_path(dest)
    if not dest.exists():
        os.rename(tmp, dest)
        fsync_folder(dest.parent)
        return
    os.rename(dest, aside)  # from here until the next rename, only the aside copy holds a version
    try:
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):  # put the old one back (or leave it to settle_folder)
            os.rename(aside, dest)
        raise
    fsync_folder(dest.parent)
    shutil.rmtree(aside, ignore_errors=True)


def settle_folder(dest: Path) -> None:
    """Finish or roll back a replacement of `dest` that a crash cut short; drop dead writers' temp folders."""
    aside = aside_path(dest)
    if aside.exists():
        if dest.exists():  # the new version got in: only the old one's deletion was left
            shutil.rmtree(aside, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):  # another reader may have done it just now
                os.rename(aside, dest)
                log.warning("%s: restored the previous version (a replacement was interrupted)", dest)
    if not dest.parent.is_dir():
        return
    for partial in dest.parent.glob(f".{dest.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid.isdigit() and not pid_exists(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
