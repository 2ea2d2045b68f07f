"""A job as the store last saw it, and the states a job goes through: what the queue (`jobs`) and
the places a job runs (`cluster`) both speak, without importing each other.

`job_from_row` joins the store's queue facts (a jobs.sqlite row) with its run folder, which owns
the job's state, error, progress and metrics.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import runs
from .job_store import QUEUE

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
JOB_STATES: tuple[str, ...] = runs.STATES
FINISHED_STATES = runs.FINISHED_STATES
RESUMABLE_STATES = ("interrupted", "cancelled", "failed")
HEARTBEAT_SECONDS = 2.0  # how often a job process says it is alive
LOG_FILE = "job.log"


@dataclass(frozen=True)
class Job:
    """One training job as the store last saw it (times are Unix seconds)."""

    id: str
    name: str
    state: JobState
    recipe: dict[str, Any]
    run_dir: Path
    created_at: float
    started_at: float | None
    finished_at: float | None
    # From the run folder (runs.read_run):
    step: int
    total_steps: int | None
    eta_seconds: float | None  # running jobs only, from this attempt's seconds per step
    metrics: dict[str, Any]  # latest loss, val_loss, learning_rate, tokens_per_second; final ones when done
    adapter_dir: Path | None  # set when succeeded
    error: str | None  # why it failed, or how it was interrupted
    log_path: Path
    cancel_requested: bool
    attempts: int  # how many times a worker started it
    resumes_from_checkpoint: bool  # its next (or current) run continues from the last checkpoint
    heartbeat_at: float | None
    pid: int | None  # the process running it (the worker's until the job process starts)
    queue_position: int | None  # 1 = next to start; None unless queued
    trust_remote_code: bool = False  # the operator allowed this job's base to run its own code
    damaged: str | None = None  # why its row in the store cannot be read (it is listed, never run)
    cluster: str | None = None  # where it runs: None = this machine's worker, "ray" = a Ray cluster
    cluster_address: str | None = None  # the cluster's address, e.g. http://HEAD:8265
    submission_id: str | None = None  # the cluster's id of its current attempt

    @property
    def where(self) -> str:
        """Where it runs, in words."""
        return f"{self.cluster} cluster at {self.cluster_address}" if self.cluster else "this machine"

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def progress(self) -> float | None:
        """Share of steps done, 0..1, when the total is known."""
        return min(self.step / self.total_steps, 1.0) if self.total_steps else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (paths as strings)."""
        row = dataclasses.asdict(self)
        row.update({k: str(v) for k, v in row.items() if isinstance(v, Path)}, progress=self.progress)
        return row


def job_from_row(row: sqlite3.Row, queue: dict[str, int]) -> Job:
    """The store's queue facts joined with its run folder's state, error, progress and metrics.

    A row that cannot be read (say its recipe is not JSON) becomes a Job marked `damaged`, so
    listing shows it beside the others and the worker fails it instead of stopping.
    """
    try:
        return _read_job(dict(row), queue)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return _damaged_job(dict(row), f"its record in the job store is damaged ({type(e).__name__}: {e})")


def _damaged_job(r: dict[str, Any], why: str) -> Job:
    number = lambda v: v if isinstance(v, (int, float)) else None  # noqa: E731
    run_dir = Path(str(r.get("run_dir") or "."))
    return Job(
        id=str(r.get("id")), name=str(r.get("name")), state="failed",
        recipe={}, run_dir=run_dir, created_at=number(r.get("created_at")) or 0.0,
        started_at=number(r.get("started_at")), finished_at=number(r.get("finished_at")), step=0,
        total_steps=None, eta_seconds=None, metrics={}, adapter_dir=None, error=why,
        log_path=run_dir / LOG_FILE, cancel_requested=False, attempts=number(r.get("attempt")) or 0,
        resumes_from_checkpoint=False, heartbeat_at=None, pid=None, queue_position=None, damaged=why,
    )  # fmt: skip


def _read_job(r: dict[str, Any], queue: dict[str, int]) -> Job:
    recipe = json.loads(r["recipe"])
    if not isinstance(recipe, dict) or r["queue"] not in QUEUE:
        raise ValueError(
            "its recipe is not a JSON object" if not isinstance(recipe, dict) else "unknown queue state"
        )
    run_dir = Path(r["run_dir"])
    run = runs.read_run(run_dir)
    state, error = _state(r["queue"], run)
    return Job(
        id=r["id"],
        name=r["name"],
        state=state,
        recipe=recipe,
        run_dir=run_dir,
        created_at=r["created_at"],
        started_at=r["started_at"],
        finished_at=run.ended_at if state in (*FINISHED_STATES, "interrupted") else None,
        step=run.step,
        total_steps=run.max_steps,
        eta_seconds=run.eta_seconds() if state == "running" else None,
        metrics=run.latest,
        adapter_dir=run.adapter,
        error=error,
        log_path=run_dir / LOG_FILE,
        cancel_requested=bool(r["cancel_requested"]),
        attempts=r["attempt"],
        resumes_from_checkpoint=bool(r["resume"]),
        heartbeat_at=r["heartbeat_at"],
        pid=r["pid"],
        queue_position=queue.get(r["id"]),
        trust_remote_code=bool(r.get("trust_remote_code")),
        cluster=r.get("cluster"),
        cluster_address=r.get("address"),
        submission_id=r.get("submission_id"),
    )


def _state(queue: str, run: runs.Run) -> tuple[JobState, str | None]:
    """A job's state and error: its run folder's, once no attempt holds it.

    While an attempt holds it the job is running (or queued, on a cluster that has not started it),
    even if its folder already says how it ended: it has ended when the attempt lets go, and only
    then can it be resumed. The folder's status is written under the store's lock with every queue
    change, so an ended job's folder disagrees only when that write failed (a folder deleted or
    unwritable): then say so.
    """
    if queue == "queued":
        return "queued", None
    if queue == "taken":
        return ("queued" if run.state == "queued" else "running"), None
    if run.updated_at is None:  # no status.json
        return "failed", f"its run folder {run.folder} is gone or unreadable"
    if run.state in ("queued", "running"):
        return "interrupted", run.error or "interrupted: its run folder was not told how it ended"
    return run.state, run.error  # type: ignore[return-value]
