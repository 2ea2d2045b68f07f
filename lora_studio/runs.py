"""Runs: the run folder (the one record of a training run) and the run index that finds it again.

    recipe = runs.pin(recipe)              # paths absolute; a fresh $LORA_STUDIO_HOME/runs/<name>-<id>
    runs.start(recipe, data_report, resume_step=None)   # config.yaml, status.json, the index entry
    runs.list_runs()                       # every indexed run, newest first: name, base, state, steps, ...
    runs.adapter_folder("tiny")            # a folder, or a run name or id -> its adapter folder

A run folder holds what training writes (see training.py): config.yaml, data_report.json,
metrics.jsonl, status.json, train.log, checkpoints/ and adapter/. Training writes these only
through this module, and the job service reads progress and metrics back from it: the job store
keeps queue facts only. Every file is written atomically (files.py); a crashed run's folder is
settled by the next `start` (run_folder.py tells whole checkpoints from broken ones).

status.json says where the run stands, in the one vocabulary runs and jobs share (`STATES`):
state, id, name, pid and host, timestamps, progress (step, max_steps, seconds per step), and, when
it ended, the final metrics or the error. A run left "running" by a process that is gone reads
back as "interrupted".

The index is one small JSON file per run under $LORA_STUDIO_HOME/index/, written atomically by
the run's main process when it starts, so runs started anywhere (the CLI in any folder, `accelerate
launch`, a job, the UI) are found again; concurrent writers never share a file. An entry whose
folder is gone is pruned when listed. The default run folder is $LORA_STUDIO_HOME/runs/<name>-<id>
unless the recipe sets output_dir. No heavy imports: `lora-studio runs list` stays quick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import storage
from .config import DEFAULT_BASE_MODEL, Recipe
from .errors import ConfigError, ModelError
from .files import atomic_write_text, pid_exists, settle_folder
from .home import studio_home
from .run_folder import METRICS_FILE, read_metrics, remove_incomplete_checkpoints

log = logging.getLogger(__name__)

STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED_STATES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
STATUS_FILE = "status.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
ADAPTER = "adapter"
_ID = re.compile(r"^[0-9a-f]{6,12}$")


# --- choosing and pinning the folder ---------------------------------------------------------------
def is_main_process() -> bool:
    """Whether this process writes the run folder (rank 0 of `accelerate launch`, or the only one)."""
    # torchrun / accelerate launch set RANK; asking accelerate's PartialState here instead would
    # initialise it before the Trainer does, without the CPU flag, and lose the process group.
    return int(os.environ.get("RANK", "0")) == 0


def new_id() -> str:
    """A short run id. Under `accelerate launch` every process must pick the same folder, so there
    it comes from what they share: their launcher's pid and rendezvous port."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        shared = f"{os.getppid()}:{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        return hashlib.sha256(shared.encode()).hexdigest()[:8]
    return uuid.uuid4().hex[:8]


def default_folder(name: str, run_id: str, home: Path | None = None) -> Path:
    """<home>/runs/<name>-<id>: where a run goes when its recipe sets no output_dir.

    `home` is $LORA_STUDIO_HOME unless given (a job store's own folder).
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
    return (home or studio_home()) / "runs" / f"{safe}-{run_id}"


def pin(recipe: Recipe, *, resume: bool = False, run_dir: Path | None = None) -> Recipe:
    """The recipe with every path absolute and its run folder chosen: the one place paths are pinned.

    The folder is the recipe's output_dir, else `run_dir`, else (resuming) the newest indexed run
    of this name, else a fresh default_folder. Pinned, the recipe repeats or resumes the run from
    any folder (the job worker runs elsewhere), and config.yaml records it so.
    """
    raw = recipe.to_dict()
    for key in ("train_file", "val_file"):
        if raw["data"][key]:
            raw["data"][key] = str(Path(raw["data"][key]).expanduser().resolve())
    base = Path(raw["model"]["base_model"]).expanduser()
    if raw["model"]["base_model"] != DEFAULT_BASE_MODEL and base.exists():
        raw["model"]["base_model"] = str(base.resolve())
    out = raw["train"]["output_dir"]
    if out:
        folder = Path(out).expanduser().resolve()
    elif run_dir is not None:
        folder = Path(run_dir).expanduser().resolve()
    elif resume:
        folder = _newest_folder_named(recipe.name)
    else:
        folder = default_folder(recipe.name, new_id())
    raw["train"]["output_dir"] = str(folder)
    return Recipe.from_dict(raw)


def _newest_folder_named(name: str) -> Path:
    named = [r for r in list_runs() if r.name == name]
    if not named:
        raise ConfigError(
            f"nothing to resume: no run named {name!r} in the run index ({index_folder()}); "
            "set output_dir to the run folder, or start the run without --resume"
        )
    return named[0].folder


# --- writing the folder (main process only) --------------------------------------------------------
def start(recipe: Recipe, data_report: dict[str, Any], resume_step: int | None) -> None:
    """Open a pinned recipe's run folder for training, and index it.

    Clears first what a crash left broken (half-written checkpoints, an adapter save or replacement
    cut short), writes config.yaml and data_report.json, and trims metrics.jsonl: a fresh run
    starts it empty, a resumed one keeps the rows up to its checkpoint (the steps after are redone).
    This is the only resume trim, for CLI runs and jobs alike.
    """
    if not is_main_process():
        return
    run_dir = recipe.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    settle_folder(run_dir / ADAPTER)
    remove_incomplete_checkpoints(run_dir)
    old = read_status(run_dir)
    run_id = old.get("id") or _id_in_name(run_dir, recipe.name) or new_id()
    resumed = resume_step is not None
    atomic_write_text(run_dir / CONFIG_FILE, recipe.to_yaml())
    atomic_write_text(run_dir / "data_report.json", json.dumps(data_report, indent=2))
    trim_metrics(run_dir, resume_step)
    now = time.time()
    # A resumed run keeps its record (created_at, warnings, ...); an ended attempt's outcome goes.
    kept = {k: v for k, v in old.items() if k not in ("error", "metrics", "adapter", "ended_at")}
    status = {
        **(kept if resumed else {}),
        "id": run_id,
        "name": recipe.name,
        "state": "running",
        "resumed": resumed,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "created_at": old.get("created_at", now) if resumed else now,
        "started_at": now,
        "updated_at": now,
        "progress": {"step": resume_step or 0, "max_steps": (old.get("progress") or {}).get("max_steps")},
    }
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(status, indent=2))
    if not storage.is_scratch(run_dir):  # a node's copy of a run on object storage: its face is indexed
        register(run_dir, run_id, recipe.name, recipe.model.base_model, recipe.task, status["created_at"])


def trim_metrics(run_dir: Path, resume_step: int | None) -> None:
    """Drop metrics rows past `resume_step` (and a torn last line); all of them when None."""
    path = Path(run_dir) / METRICS_FILE
    if resume_step is None:
        path.unlink(missing_ok=True)
    elif path.is_file():
        kept = [row for row in read_metrics(path) if row["step"] <= resume_step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """One metrics row, in one write: a crash cuts at most this line (readers skip a torn one)."""
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def write_status(run_dir: Path, state: str | None = None, durable: bool = True, **fields: Any) -> None:
    """Update status.json: a new state (one of STATES; None keeps it) and any fields, e.g. error=..."""
    if not is_main_process():
        return
    assert state is None or state in STATES, state
    status = read_status(run_dir)
    status.update(updated_at=time.time(), **fields)
    if state is not None:
        status["state"] = state
    if state in ("queued", "running"):
        status.pop("ended_at", None)
    elif state is not None:
        status["ended_at"] = status["updated_at"]
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # a job's folder: its status comes before training
    atomic_write_text(Path(run_dir) / STATUS_FILE, json.dumps(status, indent=2, default=str), durable)
    storage.write_through(Path(run_dir), STATUS_FILE)  # a run on object storage: the bucket's copy too


def write_progress(run_dir: Path, step: int, max_steps: int | None, seconds_per_step: float | None) -> None:
    """Record how far training got (for progress bars and ETAs: `jobs list`, the UI).

    Not fsynced: it is written often, inside the job's fence (which holds the job store's lock).
    """
    progress = {"step": step, "max_steps": max_steps, "seconds_per_step": seconds_per_step, "at": time.time()}
    write_status(run_dir, "running", durable=False, progress=progress)


def ended_state(error: BaseException) -> str:
    """The state a run ends in when `error` stops it: interrupted (resumable), cancelled or failed."""
    from .errors import TrainingCancelled, TrainingInterrupted

    if isinstance(error, (KeyboardInterrupt, TrainingInterrupted)):
        return "interrupted"
    return "cancelled" if isinstance(error, TrainingCancelled) else "failed"


def log_to_file(run_dir: Path) -> logging.Handler:
    """Copy the log into the run folder's train.log (a no-op handler on other processes)."""
    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path) if is_main_process() else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _id_in_name(run_dir: Path, name: str) -> str | None:
    """The id in a default folder's name (<name>-<id>): a job's folder carries its job id."""
    prefix = default_folder(name, "").name
    rest = run_dir.name[len(prefix) :] if run_dir.name.startswith(prefix) else ""
    return rest if _ID.match(rest) else None


# --- reading a folder back -------------------------------------------------------------------------
def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows in order (a line a crash cut short is skipped)."""
    storage.refresh(run_dir)  # a run on object storage: its face's copy, fresh
    return read_metrics(Path(run_dir) / METRICS_FILE)


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json as a dict; {} when there is none (not started, or not a run folder).

    For a run on object storage, its face's copy, refreshed from the bucket (storage.refresh):
    metrics.jsonl and the checkpoint markers are refreshed with it.
    """
    storage.refresh(run_dir)
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


@dataclass(frozen=True)
class Run:
    """One run as its folder tells it (times are Unix seconds)."""

    id: str
    name: str
    folder: Path
    base_model: str
    task: str
    state: str  # one of STATES
    step: int
    max_steps: int | None
    seconds_per_step: float | None
    progress_at: float | None
    best_val_loss: float | None
    latest: dict[str, Any]  # the latest value of each metric; the final metrics once it succeeded
    created_at: float | None
    updated_at: float | None
    ended_at: float | None
    error: str | None
    storage: str | None = None  # where the run lives when on object storage (s3://...); `folder` is its face

    @property
    def adapter(self) -> Path | None:
        """The finished adapter folder, when the run succeeded and it is there (for a run on object
        storage: once downloaded; `adapter_folder` downloads it)."""
        if self.storage is not None:
            from .adapter_cache import cached

            return cached(self.folder) if self.state == "succeeded" else None
        folder = self.folder / ADAPTER
        return folder if self.state == "succeeded" and (folder / "lora_studio.json").is_file() else None

    def eta_seconds(self) -> float | None:
        """Seconds left, from this attempt's pace; None unless running with a known pace."""
        if self.state != "running" or not (self.seconds_per_step and self.max_steps and self.progress_at):
            return None
        left = (self.max_steps - self.step) * self.seconds_per_step
        return max(0.0, left - (time.time() - self.progress_at))

    def to_dict(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row.update(folder=str(self.folder), adapter=self.adapter and str(self.adapter))
        return row


def read_run(run_dir: Path, entry: dict[str, Any] | None = None) -> Run:
    """A run folder's status, progress and metrics (`entry`: its index entry, for what the folder lacks)."""
    run_dir, entry = Path(run_dir), entry or {}
    status, rows = read_status(run_dir), read_metrics(run_dir / METRICS_FILE)
    progress, final = status.get("progress") or {}, status.get("metrics") or {}
    latest: dict[str, Any] = {}
    for row in rows:
        latest.update((k, v) for k, v in row.items() if k not in ("time", "max_steps"))
    latest.update(final)
    val = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))]
    best = final.get("best_val_loss", min(val) if val else None)
    steps = [progress.get("step") or 0, *(r["step"] for r in rows)]
    recipe = {} if entry.get("base_model") and entry.get("task") else _config(run_dir)
    return Run(
        id=status.get("id") or entry.get("id") or "",
        name=status.get("name") or entry.get("name") or recipe.get("name") or run_dir.name,
        folder=run_dir,
        base_model=entry.get("base_model") or (recipe.get("model") or {}).get("base_model", "?"),
        task=entry.get("task") or recipe.get("task", "chat"),
        state=_state(status),
        step=final.get("global_step", max(steps)),
        max_steps=progress.get("max_steps")
        or next((r["max_steps"] for r in reversed(rows) if r.get("max_steps")), None),
        seconds_per_step=progress.get("seconds_per_step"),
        progress_at=progress.get("at"),
        best_val_loss=best,
        latest=latest,
        created_at=status.get("created_at") or entry.get("created_at"),
        updated_at=status.get("updated_at"),
        ended_at=status.get("ended_at"),
        error=status.get("error"),
        storage=storage.remote_of(run_dir),
    )


def _state(status: dict[str, Any]) -> str:
    """The status's state; "running" written by a process gone from this host reads "interrupted"."""
    state = status.get("state")
    if state not in STATES:
        return "queued" if not status else "failed"
    if state == "running" and status.get("host") == socket.gethostname() and status.get("pid"):
        if not pid_exists(int(status["pid"])):
            return "interrupted"
    return state


def _config(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


# --- the index -------------------------------------------------------------------------------------
def index_folder() -> Path:
    return studio_home() / "index"


def register(run_dir: Path, run_id: str, name: str, base_model: str, task: str, created_at: float) -> None:
    """Add (or refresh) a run's index entry: one JSON file, written atomically."""
    folder = index_folder()
    folder.mkdir(parents=True, exist_ok=True)
    entry = {
        "id": run_id,
        "name": name,
        "folder": str(Path(run_dir).resolve()),
        "base_model": base_model,
        "task": task,
        "created_at": created_at,
    }
    atomic_write_text(folder / f"{run_id}.json", json.dumps(entry, indent=2))


def list_runs() -> list[Run]:
    """Every indexed run whose folder still exists, newest first; entries of deleted folders are pruned."""
    found: dict[Path, Run] = {}
    folder = index_folder()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
            run_dir = Path(entry["folder"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced right now, or not ours: never an error
        if not run_dir.is_dir():
            log.debug("pruning %s: its run folder %s is gone", path, run_dir)
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        found.setdefault(run_dir, read_run(run_dir, entry))
    return sorted(found.values(), key=lambda r: r.created_at or 0, reverse=True)


def list_adapters() -> list[Run]:
    """Indexed runs with a finished adapter, newest first."""
    return [r for r in list_runs() if r.adapter is not None]


def find(text: str) -> Run:
    """A run by id, id prefix, name or folder name; several runs of that name is an error listing them."""
    runs = list_runs()
    for key in (
        lambda r: r.id == text or r.folder.name == text,
        lambda r: r.name == text,
        lambda r: len(text) >= 4 and r.id.startswith(text),
    ):
        matches = [r for r in runs if key(r)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            listed = "; ".join(f"{r.id} ({r.state}, {r.folder})" for r in matches)
            raise ConfigError(f"{text!r} names {len(matches)} runs: {listed}. Give one of their ids")
    raise ConfigError(
        f"{text!r} is neither a folder nor a run name or id in the run index; "
        "`lora-studio runs list` shows them"
    )


def adapter_folder(text: str) -> Path:
    """Where an adapter given as a folder, a run folder, or a run name or id is.

    An existing folder wins (a run folder means its adapter/); a bare word that is none is looked
    up in the run index. Any other path is returned as given, for the loader to report.
    """
    path = Path(text).expanduser()
    if path.is_dir():
        inner = path / ADAPTER
        return inner if not (path / "adapter_config.json").exists() and inner.is_dir() else path
    if path.exists() or any(c in text for c in "/\\~") or text.startswith("."):
        return path
    run = find(text)
    if run.storage is not None and run.state == "succeeded":  # downloaded once, then from the cache
        from .adapter_cache import fetch

        return fetch(run.folder)
    if run.adapter is None:
        raise ModelError(
            f"run {run.name} ({run.id}) has no finished adapter yet: it is {run.state} ({run.folder})"
        )
    return run.adapter
