"""Crash safety: atomic files, folder replacement cut short at every step, and training killed
with SIGKILL over and over (inside checkpoint and adapter saves too) that still ends as an
uninterrupted run would.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from lora_studio import files
from lora_studio.files import aside_path, atomic_write_text, move_into_place, settle_folder, temp_folder


# --- atomic files ------------------------------------------------------------------------------------
def test_atomic_write_fsyncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "status.json", '{"state": "running"}')
    assert synced == ["file", "folder"]  # the data before the name that points at it
    assert (tmp_path / "status.json").read_text() == '{"state": "running"}'
    assert stat.S_IMODE((tmp_path / "status.json").stat().st_mode) == 0o666 & ~files._UMASK


def test_atomic_writes_to_one_file_do_not_share_a_temp_name(tmp_path, monkeypatch):
    """A second writer of the same file (another thread or process) in the middle of a write."""
    path, real_replace, calls = tmp_path / "config.yaml", os.replace, []

    def replace_after_another_writer(src, dst):
        calls.append(src)
        if len(calls) == 1:
            atomic_write_text(path, "the other writer's\n")  # lands first, then ours replaces it
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_another_writer)
    atomic_write_text(path, "ours\n")
    assert path.read_text() == "ours\n" and len(set(calls)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("fails", ["write", "rename"])
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_debris(tmp_path, monkeypatch, fails):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync" if fails == "write" else "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


# --- replacing a folder, cut short at every step -----------------------------------------------------
# A child process replaces `dest` (which holds "old") with a folder holding "new", and exits
# abruptly (os._exit, as a SIGKILL would leave it) at the chosen moment.
_REPLACE_AND_DIE = textwrap.dedent(
    """
    import os, shutil, sys
    from pathlib import Path
    from lora_studio.files import move_into_place, temp_folder

    dest, crash = Path(sys.argv[1]), sys.argv[2]
    renames, real_rename, real_rmtree = [], os.rename, shutil.rmtree

    def rename(src, dst):
        real_rename(src, dst)
        renames.append(dst)
        if crash == f"after rename {len(renames)}":
            os._exit(9)

    def rmtree(path, ignore_errors=False):
        if crash == "while deleting the old one":  # half of the old one deleted, then death
            os.unlink(sorted(Path(path).iterdir())[0])
            os._exit(9)
        real_rmtree(path, ignore_errors=ignore_errors)

    os.rename, shutil.rmtree = rename, rmtree
    tmp = temp_folder(dest)
    for name in ("a.safetensors", "b.json"):
        (tmp / name).write_text("new")
    if crash == "while writing the new one":
        os._exit(9)
    move_into_place(tmp, dest)
    """
)


@pytest.mark.parametrize(
    "crash, expect",
    [
        ("while writing the new one", "old"),
        ("after rename 1", "old"),  # the old one is aside, the new one not in yet: rolled back
        ("after rename 2", "new"),  # the new one is in, the old one not yet deleted: completed
        ("while deleting the old one", "new"),
        ("never", "new"),
    ],
)
def test_a_folder_replacement_cut_short_is_completed_or_rolled_back(tmp_path, crash, expect):
    dest = tmp_path / "adapter"
    dest.mkdir()
    for name in ("a.safetensors", "b.json"):
        (dest / name).write_text("old")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = subprocess.run([sys.executable, "-c", _REPLACE_AND_DIE, str(dest), crash], env=env).returncode
    assert code == (0 if crash == "never" else 9)

    settle_folder(dest)  # what the next writer or reader of the folder does first
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"a.safetensors": expect, "b.json": expect}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no aside copy, no dead writer's temp folder


def test_a_live_writers_temp_folder_is_left_alone_and_the_next_replacement_keeps_the_aside_copy(tmp_path):
    dest = tmp_path / "merged"
    building = temp_folder(dest)  # this process is alive: its temp folder is not debris
    aside_path(dest).mkdir()  # a replacement cut short: the old version is aside
    (aside_path(dest) / "model.safetensors").write_text("old")
    new = temp_folder(dest)
    (new / "model.safetensors").write_text("new")
    move_into_place(new, dest)  # settles first: the aside copy becomes dest, then is replaced
    assert (dest / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", building.name])
