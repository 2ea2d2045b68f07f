"""Training as a service: a persistent job queue in SQLite, run by a separate worker process.

    store = JobStore()                         # <LORA_STUDIO_HOME>/jobs.sqlite
    job_id = store.submit("recipes/smollm2-lora-cpu.yaml", ["max_steps=20"])  # validated, queued
    store.ensure_worker()                      # starts a detached `lora-studio worker` if none is alive
    job = store.get(job_id)                    # Job: state, step/total_steps, eta_seconds, metrics, ...
    points = store.metrics(job_id)             # its run folder's rows: [{"step": 5, "loss": 2.1, ...}, ...]
    text, offset = store.read_log(job_id)      # the job's log so far; pass offset back to get only what is new
    store.cancel(job_id)                       # queued: never runs; running: checkpoint at the next step, then stops
    store.resume(job_id)                       # interrupted/cancelled/failed: queued again, continues from its checkpoint

Public API (stable; the CLI and the web UI use only this): `JobStore(path=None)` with `submit`,
`list`, `get`, `metrics`, `read_log`, `cancel`, `resume`, `recover`, `ensure_worker`,
`worker_pid`; the `Job` dataclass; `JOB_STATES`. The methods under "worker side" are for
`lora_studio.worker` and `lora_studio.job_process` only.

The store keeps queue facts only: whether the job waits, is taken by an attempt or is done, the
attempt, pid, heartbeat, where it runs and the run folder. A job's state, error, progress and
metrics are its run folder's status.json and metrics.jsonl, read through `runs`: one record of a
run for a job, a CLI run and the UI. Whoever changes the state writes status.json, inside the
store's write lock and only for the current attempt: the store for submit, claim, cancel, resume
and an attempt that died; the job process (through `training` and `finish`) for how it ended.

States (`runs.STATES`, shared with run folders): queued -> running -> succeeded | failed |
cancelled | interrupted. A running job whose
process died (killed, out of memory, machine restart) is marked interrupted as soon as anyone
reads the store (its pid is gone). A job process alive on this host is never judged by its
heartbeat (it may be stopped with SIGSTOP, suspended or starved); only a job running on another
host is marked interrupted when its heartbeat is older than `heartbeat_timeout`.
`resume` puts interrupted, cancelled and failed jobs back in the queue; they continue from
their run folder's last whole checkpoint (at most one checkpoint interval of work is lost).

Each job's run folder is `<home>/runs/<name>-<job id>` unless its recipe sets output_dir; it holds
what `training.train` writes, plus `job.log` (everything the job process printed). Every state
change is one transaction (`BEGIN IMMEDIATE`), guarded by the job's attempt number, so a late
write from a superseded process never overwrites a newer attempt. The job process writes its run
folder (status, metrics, the adapter) inside `fence`, which holds the store's write lock and
checks the attempt is still current, so a superseded attempt writes nothing there either.

A damaged jobs.sqlite gives a JobError saying so and how to start afresh, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import cluster, runs, worker_launch
from .config import Recipe
from .errors import ConfigError, JobError, TrainingCancelled
from .home import studio_home
from .job_record import (
    FINISHED_STATES,
    HEARTBEAT_SECONDS,
    JOB_STATES,
    LOG_FILE,
    RESUMABLE_STATES,
    Job,
    JobState,
    job_from_row,
)
from .job_store import LOCAL, SELECT_JOBS, Database, is_current, queue_positions
from .remote_code import check_remote_code
from .run_folder import last_complete_checkpoint

__all__ = [
    "FINISHED_STATES",
    "HEARTBEAT_SECONDS",
    "JOB_STATES",
    "LOG_FILE",
    "RESUMABLE_STATES",
    "Job",
    "JobState",
    "JobStore",
]


class JobStore:
    """The job queue: one SQLite file (WAL mode) that callers, the worker and job processes share."""

    def __init__(self, path: str | Path | None = None, *, heartbeat_timeout: float = 120.0):
        path = Path(path) if path is not None else studio_home() / "jobs.sqlite"
        self.path = Path(path).expanduser().resolve()
        self.home = self.path.parent
        self.heartbeat_timeout = heartbeat_timeout
        self.home.mkdir(parents=True, exist_ok=True)
        self._db = Database(self.path)
        self.recover()  # a store opening is a service starting: settle jobs of processes that died

    # --- submitting and reading -----------------------------------------------------------------
    def submit(
        self,
        recipe: Recipe | dict[str, Any] | str | Path,
        overrides: Sequence[str] = (),
        *,
        trust_remote_code: bool = False,
        placement: cluster.Placement | None = None,
    ) -> str:
        """Validate a recipe (a Recipe, a mapping or a YAML path) and queue it; returns the job id.

        Bad recipes (unknown keys, wrong types, a missing or unreadable data file, asking for
        remote code without `trust_remote_code`) raise ConfigError/DataError/ModelError here and
        never enter the queue. `trust_remote_code` is the submitting operator's word: recorded on
        this job alone, and the only permission its process gets (remote_code.py). With a
        `placement` the job runs on that cluster (`cluster.start` hands it over) and its run folder
        is under the placement's storage.
        """
        job_id = uuid.uuid4().hex[:10]
        recipe = Recipe.load(recipe, overrides)
        check_remote_code(recipe.model, allowed=trust_remote_code)
        if placement and trust_remote_code:
            raise ConfigError(
                "--trust-remote-code: not for a job on a cluster (its nodes would run the base's code "
                "unseen by this machine's operator); run it on this machine"
            )
        home = placement.storage if placement and placement.storage else self.home  # <home>/runs/<name>-<id>
        recipe = runs.pin(recipe, run_dir=runs.default_folder(recipe.name, job_id, home))
        _check_data(recipe)
        if recipe.train.num_workers > 1 and not placement:
            raise ConfigError(
                f"train.num_workers: {recipe.train.num_workers} workers need a Ray cluster; submit with "
                "--cluster ray, or set train.num_workers: 1 to train on this machine"
            )
        now = time.time()
        with self._db.transaction() as db:
            rows = db.execute("SELECT id, queue FROM jobs WHERE run_dir = ?", (str(recipe.output_dir),))
            resumable = runs.read_run(recipe.output_dir).state == "interrupted"
            clash = next((job for job, queue in rows.fetchall() if queue != "done" or resumable), None)
            if clash:
                raise ConfigError(
                    f"job {clash} already uses the run folder {recipe.output_dir}; "
                    "set a different output_dir, or leave it empty for a fresh folder per job"
                )
            db.execute(
                "INSERT INTO jobs (id, name, queue, recipe, run_dir, created_at, queued_at, trust_remote_code) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (
                    job_id,
                    recipe.name,
                    json.dumps(recipe.to_dict()),
                    str(recipe.output_dir),
                    now,
                    now,
                    int(trust_remote_code),
                ),
            )
            if placement:  # in the same transaction: the local worker never sees it unplaced
                db.execute(
                    "INSERT INTO placements (job_id, cluster, address) VALUES (?, ?, ?)",
                    (job_id, placement.cluster, placement.address),
                )
            runs.write_status(recipe.output_dir, "queued", id=job_id, name=recipe.name, created_at=now)
        return job_id

    def list(self, states: Sequence[str] | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first, optionally only those in `states`."""
        self.recover()
        query = SELECT_JOBS + " ORDER BY seq DESC" + (f" LIMIT {int(limit)}" if limit and not states else "")
        with self._db.connect() as db:
            rows = db.execute(query).fetchall()
            queue = queue_positions(db)
        jobs = [job_from_row(row, queue) for row in rows]  # the state is each run folder's: filter here
        jobs = [job for job in jobs if job.state in states] if states else jobs
        return jobs[:limit] if limit else jobs

    def has_queued(self) -> bool:
        """Whether a job waits for this machine's worker."""
        with self._db.connect() as db:
            return (
                db.execute(f"SELECT 1 FROM jobs WHERE queue = 'queued' AND {LOCAL} LIMIT 1").fetchone()
                is not None
            )

    def get(self, job_id: str) -> Job:
        """One job by id (a unique prefix of the id works too)."""
        self.recover()
        with self._db.connect() as db:
            row = db.execute(SELECT_JOBS + " WHERE jobs.id = ?", (self._full_id(db, job_id),)).fetchone()
            return job_from_row(row, queue_positions(db))

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every logged metrics row of a job, in step order (what a loss plot needs): its run folder's."""
        return runs.metrics_rows(self.get(job_id).run_dir)

    def read_log(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        """The job's log from byte `offset` on, and the offset to pass next time."""
        job = self.get(job_id)
        if job.cluster:
            return cluster.executor_for(job).read_log(job, offset)
        path = job.log_path
        if not path.is_file():
            return "", offset
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        return data.decode("utf-8", errors="replace"), offset + len(data)

    # --- changing jobs ----------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued or interrupted one at once; a running one at its next step (after a checkpoint)."""
        with self._db.transaction() as db:
            job_id = self._full_id(db, job_id)
            row = db.execute(SELECT_JOBS + " WHERE jobs.id = ?", (job_id,)).fetchone()
            job = job_from_row(row, {})
            if job.finished:
                raise JobError(f"job {job_id} already ended as {job.state}; there is nothing to cancel")
            if row["queue"] == "taken":  # running, or handed to a cluster: it stops itself
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                db.execute("UPDATE jobs SET queue = 'done', cancel_requested = 0 WHERE id = ?", (job_id,))
                runs.write_status(job.run_dir, "cancelled", error=f"cancelled while {job.state}")
        job = self.get(job_id)
        if job.cluster and job.cancel_requested:
            cluster.executor_for(job).stop(job)  # the cluster stops it; `recover` reads how it ended
        return self.get(job_id)

    def resume(self, job_id: str, *, restart: bool = False, trust_remote_code: bool = False) -> Job:
        """Queue an interrupted, cancelled or failed job again, to continue from its last whole checkpoint.

        `trust_remote_code` is the resuming operator's word, recorded anew (as at submit).

        A job stopped before its first checkpoint was whole starts over (it lost at most one
        checkpoint interval). If checkpoints were written but are gone, this refuses unless
        `restart` (start over from step 0).
        """
        job = self.get(job_id)
        if job.damaged:
            raise JobError(f"job {job.id} cannot be resumed: {job.damaged}; submit its recipe again")
        if job.state not in RESUMABLE_STATES:
            raise JobError(
                f"job {job.id} is {job.state}; only {', '.join(RESUMABLE_STATES)} jobs can be resumed"
            )
        check_remote_code(Recipe.from_dict(job.recipe).model, allowed=trust_remote_code)
        has_checkpoint = last_complete_checkpoint(job.run_dir) is not None
        # Past the first save step, that save finished (the Trainer saves before the next step).
        if not has_checkpoint and not restart and job.step > _first_save_step(job.recipe):
            raise JobError(
                f"job {job.id} reached step {job.step} but its checkpoints are missing from "
                f"{job.run_dir / 'checkpoints'}; `lora-studio jobs resume {job.id} --restart` "
                "starts it over from step 0"
            )
        with self._db.transaction() as db:
            row = db.execute(SELECT_JOBS + " WHERE jobs.id = ?", (job.id,)).fetchone()
            changed = row["queue"] == "done" and job_from_row(row, {}).state == job.state
            if changed:
                db.execute(
                    "UPDATE jobs SET queue = 'queued', queued_at = ?, cancel_requested = 0, resume = ?, "
                    "trust_remote_code = ? WHERE id = ?",
                    (time.time(), int(has_checkpoint), int(trust_remote_code), job.id),
                )
                db.execute("UPDATE placements SET submission_id = NULL WHERE job_id = ?", (job.id,))
                runs.write_status(job.run_dir, "queued", error=None)
        if not changed:
            raise JobError(f"job {job.id} changed state while resuming it; look at it again with `jobs show`")
        return self.get(job.id)

    def recover(self) -> list[str]:
        """Mark running jobs whose process is gone (or, on another host, silent too long) interrupted.

        Returns their ids.
        """
        with self._db.connect() as db:
            rows = db.execute(
                "SELECT id, attempt, pid, host, heartbeat_at FROM jobs WHERE queue = 'taken'"
            ).fetchall()
        now, here, lost = time.time(), socket.gethostname(), []
        for job_id, attempt, pid, host, beat in rows:
            if host == here and pid:  # ask the OS; a silent live process is stopped or starved, not dead
                if worker_launch.process_alive(pid, started_by=beat):
                    continue
                why = "its process is gone (killed, out of memory or the machine restarted)"
            elif beat is not None and now - beat > self.heartbeat_timeout:
                why = f"no heartbeat from host {host} for {now - beat:.0f} s"
            else:
                continue
            if self._end_attempt(job_id, attempt, why):
                lost.append(job_id)
        return lost + cluster.sync(self)  # a cluster's jobs: as their cluster says

    # --- the worker process (lora_studio.worker) ----------------------------------------------------
    def ensure_worker(self, concurrency: int = 1, idle_exit_seconds: float | None = 600) -> int | None:
        """Start a detached `lora-studio worker` unless one is alive; returns its pid (None: one was alive).

        Returns when the new worker serves the store (well under a second). The auto-started
        worker exits after `idle_exit_seconds` with nothing to do (None: never).
        """
        return worker_launch.ensure_worker(self, concurrency, idle_exit_seconds)

    def worker_pid(self) -> int | None:
        """The pid of the worker serving this store, or None when none is running."""
        return worker_launch.worker_pid(self)

    # --- worker side (lora_studio.worker) ---------------------------------------------------------
    def claim_next(self, worker_pid: int) -> Job | None:
        """Move the oldest queued job to running for a worker; None when the queue is empty.

        A job whose row is damaged is marked failed with the reason, and the next one is claimed.
        """
        while (job := self._claim_one(worker_pid)) is not None and job.damaged:
            with self._db.transaction() as db:  # it reads as failed, with why (_damaged_job)
                db.execute("UPDATE jobs SET queue = 'done' WHERE id = ?", (job.id,))
        return job

    def _claim_one(self, worker_pid: int) -> Job | None:
        with self._db.transaction() as db:
            row = db.execute(
                f"SELECT id FROM jobs WHERE queue = 'queued' AND {LOCAL} ORDER BY queued_at, seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            now, host = time.time(), socket.gethostname()
            db.execute(
                "UPDATE jobs SET queue = 'taken', attempt = attempt + 1, started_at = "
                "COALESCE(started_at, ?), pid = ?, host = ?, heartbeat_at = ? WHERE id = ?",
                (now, worker_pid, host, now, row[0]),
            )
            job = job_from_row(db.execute(SELECT_JOBS + " WHERE jobs.id = ?", (row[0],)).fetchone(), {})
            if not job.damaged:  # the job process's own pid replaces the worker's when training starts
                runs.write_status(job.run_dir, "running", error=None, pid=worker_pid, host=host)
        return self.get(row[0])

    def attempt_started(self, job_id: str, attempt: int, pid: int) -> None:
        self._update(job_id, attempt, pid=pid, host=socket.gethostname(), heartbeat_at=time.time())

    def heartbeat(self, job_id: str, attempt: int) -> None:
        self._update(job_id, attempt, heartbeat_at=time.time())

    @contextlib.contextmanager
    def fence(self, job_id: str, attempt: int) -> Iterator[None]:
        """Hold the store's write lock while a job attempt writes to its run folder.

        Raises TrainingCancelled if a newer attempt owns the job (or it is no longer running).
        While the lock is held nobody can claim, resume or settle the job, so the check cannot go
        stale before the write. Keep the body short and free of other store calls (they would wait).
        """
        with self._db.transaction() as db:
            if not is_current(db, job_id, attempt):
                raise TrainingCancelled(
                    f"job {job_id} attempt {attempt} was superseded by a newer attempt; "
                    "it writes nothing more to the run folder"
                )
            yield

    def stop_reason(self, job_id: str, attempt: int) -> str | None:
        """Why a running attempt should stop now: 'cancelled', 'superseded' or None (keep going)."""
        with self._db.connect() as db:
            row = db.execute(
                "SELECT attempt, queue, cancel_requested FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        if row is None or row[0] != attempt or row[1] != "taken":
            return "superseded"
        return "cancelled" if row[2] else None

    def finish(self, job_id: str, attempt: int, state: JobState, *, error: str | None = None) -> bool:
        """Record in the run folder how an attempt ended; False if a newer attempt owns the job now.

        An attempt marked interrupted while it was still alive (silent on another host) may still say
        how it really ended.
        """
        with self._db.transaction() as db:
            row = db.execute(
                "SELECT run_dir, queue FROM jobs WHERE id = ? AND attempt = ?", (job_id, attempt)
            ).fetchone()
            run_dir = Path(row[0]) if row else None
            if run_dir is None or row[1] == "queued":
                return False
            if row[1] == "done" and runs.read_run(run_dir).state != "interrupted":
                return False
            db.execute("UPDATE jobs SET queue = 'done', cancel_requested = 0 WHERE id = ?", (job_id,))
            runs.write_status(run_dir, state, error=error)
        return True

    def process_exited(self, job_id: str, attempt: int, returncode: int) -> None:
        """The worker saw a job process exit; if it left the job running, it died without a word."""
        how = (
            f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
            if returncode < 0
            else f"exited with code {returncode}"
        )
        self._end_attempt(job_id, attempt, f"its process {how} before recording a result")

    # --- cluster side (lora_studio.cluster) --------------------------------------------------------
    def placed_jobs(self) -> list[Job]:
        """The jobs a cluster runs now (handed over, not ended), as the store last saw them: for `cluster.sync`."""
        with self._db.connect() as db:
            rows = db.execute(
                SELECT_JOBS + " WHERE placements.submission_id IS NOT NULL AND jobs.queue = 'taken'"
            ).fetchall()
        return [job_from_row(row, {}) for row in rows]

    def dispatched(self, job_id: str, submission_id: str) -> int:
        """A queued job was handed to its cluster as `submission_id`: a new attempt (returned)."""
        with self._db.transaction() as db:
            db.execute(
                "UPDATE jobs SET queue = 'taken', attempt = attempt + 1, started_at = COALESCE(started_at, ?) "
                "WHERE id = ?",
                (time.time(), job_id),
            )
            db.execute("UPDATE placements SET submission_id = ? WHERE job_id = ?", (submission_id, job_id))
            return db.execute("SELECT attempt FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def settle(self, job_id: str, attempt: int, state: JobState, *, error: str | None = None) -> bool:
        """Record the end a cluster reports for an attempt in its run folder; False if nothing changed.

        A state that is not an end is the job process's to write (it does, in its run folder).
        What the job process already wrote there about its end is kept.
        """
        if state not in (*FINISHED_STATES, "interrupted"):
            return False
        with self._db.transaction() as db:
            row = db.execute(
                "SELECT run_dir FROM jobs WHERE id = ? AND attempt = ? AND queue = 'taken'", (job_id, attempt)
            ).fetchone()
            if row is None:
                return False
            db.execute("UPDATE jobs SET queue = 'done', cancel_requested = 0 WHERE id = ?", (job_id,))
            if runs.read_status(Path(row[0])).get("state") != state:
                runs.write_status(Path(row[0]), state, error=error)
        return True

    # --- internals ----------------------------------------------------------------------------------
    def _end_attempt(self, job_id: str, attempt: int, why: str) -> bool:
        """A running attempt died: interrupted (resumable), or cancelled if that was asked for.

        An end the attempt recorded itself before dying (say succeeded) stands.
        """
        with self._db.transaction() as db:
            row = db.execute(
                "SELECT run_dir, cancel_requested FROM jobs WHERE id = ? AND attempt = ? AND queue = 'taken'",
                (job_id, attempt),
            ).fetchone()
            if row is None:
                return False
            db.execute("UPDATE jobs SET queue = 'done', cancel_requested = 0 WHERE id = ?", (job_id,))
            if runs.read_status(Path(row[0])).get("state") in FINISHED_STATES:
                return False
            state = "cancelled" if row[1] else "interrupted"
            runs.write_status(Path(row[0]), state, error=f"interrupted: {why}")
        return True

    def _update(self, job_id: str, attempt: int, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._db.transaction() as db:
            db.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND attempt = ? AND queue = 'taken'",
                (*values.values(), job_id, attempt),
            )

    def _full_id(self, db: sqlite3.Connection, job_id: str) -> str:
        found = [
            r[0]
            for r in db.execute(
                "SELECT id FROM jobs WHERE id LIKE ? ORDER BY seq LIMIT 2",
                (job_id.replace("%", "").replace("_", "") + "%",),
            )
        ]
        if len(found) != 1 or not job_id:
            what = "matches several jobs; give more of it" if found else "is not a job in this store"
            raise JobError(f"{job_id!r} {what} ({self.path}); `lora-studio jobs list` shows the ids")
        return found[0]


# --- helpers ---------------------------------------------------------------------------------------
def _check_data(recipe: Recipe) -> None:
    """Parse the data files now, so a job never waits in the queue only to fail on a typo."""
    from .tasks.registry import TASKS

    TASKS[recipe.task].check_data(recipe)


def _first_save_step(recipe: dict[str, Any]) -> int:
    train = recipe["train"]
    return train["save_every_steps"] or train["eval_every_steps"]
