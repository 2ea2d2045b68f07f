"""How many compute threads this process should use: the cores it may really use, shared.

    share = threads.use("chat")        # before computing: claim a share, set torch's threads to it
    share.line("chat")                 # "chat on 1 of 2 cores: training run demo-ab12 holds 1"

torch starts one intra-op thread per core of the machine. That is right on a dedicated box and
wrong beside other work: two threads on one free core wait for each other at every parallel
region, so a training step beside one busy process ran at a third of its solo speed with two
threads and at two thirds with one (README, "Speed"). So:

- **Cores**: the CPUs this process may run on (its affinity), capped in a container by the
  cgroup's CPU quota; never simply `os.cpu_count()`.
- **Explicit wins**: `--threads N` (`set_explicit`; $LORA_STUDIO_THREADS for child processes),
  then $OMP_NUM_THREADS, are used as given: no sharing, no adapting.
- **Shared within a studio**: every process that computes (a training run, the UI's chat, `serve`,
  an evaluation) keeps a claim file under $LORA_STUDIO_HOME/threads/ while it works. The cores are
  split evenly between the claims that are alive and fresh (touched in the last HOLD_SECONDS: chat
  and serve touch theirs per request, training at every step); an explicit claim takes its own
  count first. The split is logged in one line whenever it changes.

`thread_tuning.TrainingThreads` applies this to training, and also gives up a thread when other
load on the machine slows the steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import atomic_write_text, pid_exists

log = logging.getLogger(__name__)

ENV = "LORA_STUDIO_THREADS"  # `--threads N` handed to child processes (the worker's jobs)
HOLD_SECONDS = 30.0  # a claim counts this long after its last touch: a chat holds its share between replies
TOUCH_SECONDS = 5.0  # a claim's file is rewritten at most this often while nothing about it changes
_explicit: int | None = None  # set_explicit(): this process's `--threads`
_label: str | None = None  # set_label(): how the other processes name this one's claim


# --- cores -------------------------------------------------------------------------------------------
def available_cores() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (v2 or v1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cores, quota) if quota else cores)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The tightest CPU quota on this process's cgroups in whole cores (rounded up); None: none."""
    limits = [math.ceil(q / p) for q, p in _cgroup_quotas(root) if q > 0 and p > 0]
    return max(1, min(limits)) if limits else None


def _cgroup_quotas(root: Path) -> list[tuple[int, int]]:
    """(quota, period) pairs: cgroup v2's cpu.max of this process's group and its parents, v1's cfs files."""
    found = []
    for group in _own_cgroups():
        try:
            text = (root / group / "cpu.max").read_text().split()
        except OSError:
            continue
        if len(text) == 2 and text[0] != "max":
            found.append((int(text[0]), int(text[1])))
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            found.append(
                (
                    int((folder / "cpu.cfs_quota_us").read_text()),
                    int((folder / "cpu.cfs_period_us").read_text()),
                )
            )
        except (OSError, ValueError):
            continue
    return found


def _own_cgroups() -> list[str]:
    """This process's cgroup v2 path and its parents, relative to the cgroup root."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if path is None:
        return []
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


# --- explicit settings -------------------------------------------------------------------------------
def set_explicit(threads: int | None, children: bool = False) -> None:
    """`--threads N`: this process uses N threads; with `children`, the processes it starts do too."""
    global _explicit
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: expected 1 or more compute threads, got {threads}")
    _explicit = threads
    if children and threads is not None:
        os.environ[ENV] = str(threads)


def explicit_threads() -> tuple[int, str] | None:
    """The thread count a person set, and where: --threads, then $LORA_STUDIO_THREADS, then $OMP_NUM_THREADS."""
    if _explicit is not None:
        return _explicit, "--threads"
    for name in (ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"${name}: expected a whole number of threads, 1 or more; got {value!r}")
            return int(value), f"${name}"
    return None


def set_label(label: str | None) -> None:
    """How the other processes of the studio name this one's claim, e.g. "the UI's chat"."""
    global _label
    _label = label


# --- shares ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Share:
    """The threads this process uses, out of the cores it may use, and who holds the rest."""

    threads: int
    cores: int
    held: tuple[tuple[str, int], ...] = ()  # the studio's other claims: (label, threads)
    explicit: str | None = None  # where an explicit count came from

    def line(self, doing: str) -> str:
        """One readable line, e.g. "training on 1 of 2 cores: the UI's chat holds 1"."""
        text = f"{doing} on {self.threads} of {self.cores} cores"
        if self.explicit:
            return f"{text} (set by {self.explicit})"
        return text + (": " + ", ".join(f"{label} holds {n}" for label, n in self.held) if self.held else "")

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "cores": self.cores, "explicit": self.explicit,
                "held": [{"by": label, "threads": n} for label, n in self.held]}  # fmt: skip


@dataclass
class Claims:
    """The claim files of one studio's computing processes (one per process, named by its pid)."""

    folder: Path
    pid: int = field(default_factory=os.getpid)
    started: float | None = None  # when this process's claim began: older claims get any odd core
    _written: tuple[str, int | None, float] | None = None  # (label, explicit, when) of the last write

    def touch(self, label: str, explicit: int | None, now: float | None = None) -> None:
        """Say this process is computing now (its file is rewritten at most every TOUCH_SECONDS)."""
        now = time.time() if now is None else now
        self.started = self.started or now
        last = self._written
        if last and last[:2] == (label, explicit) and now - last[2] < TOUCH_SECONDS:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        body = {"pid": self.pid, "label": label, "threads": explicit, "started": self.started, "touched": now}
        atomic_write_text(self.folder / f"{self.pid}.json", json.dumps(body), durable=False)
        self._written = (label, explicit, now)

    def release(self) -> None:
        (self.folder / f"{self.pid}.json").unlink(missing_ok=True)
        self.started = self._written = None

    def others(self, now: float | None = None) -> list[dict[str, Any]]:
        """The other processes' fresh claims; the files of dead processes are removed."""
        now = time.time() if now is None else now
        found = []
        for path in self.folder.glob("*.json") if self.folder.is_dir() else []:
            try:
                claim = json.loads(path.read_text())
                pid = int(claim["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being replaced, or not a claim
            if pid == self.pid:
                continue
            if not pid_exists(pid):
                path.unlink(missing_ok=True)
            elif now - float(claim.get("touched", 0)) < HOLD_SECONDS:
                found.append(claim)
        return found


def split(cores: int, me: dict[str, Any], others: list[dict[str, Any]]) -> Share:
    """Explicit claims take their count; the cores left go evenly to the others, any odd core to
    the oldest claims; everyone gets at least one thread. Every process computes the same split."""
    everyone = sorted([me, *others], key=lambda c: (c.get("started") or 0, c["pid"]))
    shared = [c for c in everyone if not c.get("threads")]
    left = max(cores - sum(c["threads"] for c in everyone if c.get("threads")), 0)
    each = {c["pid"]: max(1, left // len(shared) + (i < left % len(shared))) for i, c in enumerate(shared)}
    held = tuple((c["label"], c.get("threads") or each[c["pid"]]) for c in others)
    return Share(me.get("threads") or each[me["pid"]], cores, held)


class _Process:
    """This process's claim, and what it last logged."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.claims: Claims | None = None
        self.logged: tuple[str, Share] | None = None


_process = _Process()


def claims() -> Claims:
    """This process's claims registry (the folder follows $LORA_STUDIO_HOME)."""
    from .home import studio_home

    folder = studio_home() / "threads"
    if _process.claims is None or _process.claims.folder != folder or _process.claims.pid != os.getpid():
        _process.claims = Claims(folder)
    return _process.claims


def share_for(label: str, now: float | None = None) -> Share:
    """This process's share right now, after touching its claim as `label`."""
    explicit = explicit_threads()
    registry = claims()
    registry.touch(label, explicit[0] if explicit else None, now)
    if explicit:  # used as given; the claim still tells the others how many it takes
        return Share(explicit[0], available_cores(), explicit=explicit[1])
    me = {"pid": registry.pid, "label": label, "threads": None, "started": registry.started}
    return split(available_cores(), me, registry.others(now))


def use(doing: str, label: str | None = None, limit: int | None = None, quiet: bool = False) -> Share:
    """Claim a share (as `label`, else this process's label, else `doing`), set torch's threads to it
    (at most `limit`), and log "DOING on N of M cores: ..." when the share changed (unless `quiet`)."""
    import torch

    with _process.lock:
        share = share_for(label or _label or doing)
        threads = min(share.threads, limit) if limit else share.threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if not quiet and _process.logged != (doing, share):
            log.info(share.line(doing))
            _process.logged = (doing, share)
        return share


def release() -> None:
    """This process stops computing: its claim no longer counts against the others."""
    with _process.lock:
        if _process.claims is not None:
            _process.claims.release()
        _process.logged = None
