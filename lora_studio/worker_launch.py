"""Starting the worker, and knowing it is there: one worker per job store, held by an OS file lock.

The job queue (`jobs`) asks here whether a worker serves its store and starts one if not; the
worker (`worker`) takes the lock while it serves. Also: is a pid still one of our processes?
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .files import pid_exists


class Store(Protocol):
    """What the launcher needs of a job store: its file and its studio home."""

    path: Path
    home: Path


# --- one worker per store ------------------------------------------------------------------------
def ensure_worker(store: Store, concurrency: int = 1, idle_exit_seconds: float | None = 600) -> int | None:
    """Start a detached `lora-studio worker` unless one is alive; see JobStore.ensure_worker."""
    if worker_pid(store) is not None:
        return None
    cmd = [sys.executable, "-m", "lora_studio.cli", "worker"]
    cmd += ["--store", str(store.path), "--concurrency", str(concurrency)]
    if idle_exit_seconds is not None:
        cmd += ["--idle-exit", str(idle_exit_seconds)]
    with open(store.home / "worker.log", "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=store.home,
            start_new_session=True,
        )  # outlives its caller
    # Return once it holds the store's lock, so a second call right after this one sees it.
    deadline = time.monotonic() + 30
    while proc.poll() is None and worker_pid(store) != proc.pid and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.pid if proc.poll() is None else None  # it exits at once if another worker won the race


def worker_pid(store: Store) -> int | None:
    """The pid of the worker serving this store, or None when none is running."""
    with worker_lock(store) as held:
        if held:
            return None
    try:
        return int(lock_path(store).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def lock_path(store: Store) -> Path:
    """The lock file beside the store; it also holds the serving worker's pid."""
    return store.path.with_name(store.path.name + ".worker-lock")


@contextlib.contextmanager
def worker_lock(store: Store) -> Iterator[bool]:
    """Hold the one-worker-per-store lock while inside; yields False if another process holds it.

    An OS file lock: it is released when its holder exits, even on SIGKILL.
    """
    with open(lock_path(store), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- is that process still ours? -------------------------------------------------------------------
def process_alive(pid: int, started_by: float | None = None) -> bool:
    """Whether `pid` is a live LoRA Studio process on this host (running, stopped or starved alike).

    On Linux its command line must name lora_studio and, given `started_by` (Unix time: e.g. a
    heartbeat it wrote), it must have started by then: pids get reused, and a newer process
    under an old job's pid is not that job's.
    """
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self/stat").exists():  # not Linux: the pid exists, that is all we can tell
        return pid_exists(pid)
    try:
        cmdline = (proc / "cmdline").read_bytes()  # empty for a zombie
        stat = (proc / "stat").read_text()
    except OSError:
        return False
    if b"lora_studio" not in cmdline and b"lora-studio" not in cmdline:
        return False
    return started_by is None or _start_time(stat) <= started_by + 1.0  # (boot time is in whole seconds)


def _start_time(stat: str) -> float:
    """A process's start as Unix time, from its /proc/PID/stat line."""
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the "(name)" field
    boot = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")
