"""A job as the store last saw it, and the states a job goes through: what the queue (`jobs`) and
the places a job runs (`cluster`) both speak, without importing each other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import runs

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
