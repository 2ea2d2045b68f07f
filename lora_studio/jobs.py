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

The store keeps queue facts only: state, attempt, pid, heartbeat and the run folder. A job's
progress and metrics are its run folder's, read through `runs` (training writes them there), so
a job, a CLI run and the UI show one record of a run.

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
)
from .job_store import LOCAL, SELECT_JOBS, Database, is_current, queue_positions, settle_attempt
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
            clash = db.execute(
                "SELECT id FROM jobs WHERE run_dir = ? AND state IN ('queued', 'running', 'interrupted')",
                (str(recipe.output_dir),),
            ).fetchone()
            if clash:
                raise ConfigError(
                    f"job {clash[0]} already uses the run folder {recipe.output_dir}; "
                    "set a different output_dir, or leave it empty for a fresh folder per job"
                )
            db.execute(
                "INSERT INTO jobs (id, name, state, recipe, run_dir, created_at, queued_at, trust_remote_code) "
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
        return job_id

    def list(self, states: Sequence[str] | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first, optionally only those in `states`."""
        self.recover()
        query, args = SELECT_JOBS, []
        if states:
            query += f" WHERE jobs.state IN ({', '.join('?' * len(states))})"
            args.extend(states)
        query += " ORDER BY seq DESC" + (f" LIMIT {int(limit)}" if limit else "")
        with self._db.connect() as db:
            rows = db.execute(query, args).fetchall()
            queue = queue_positions(db)
        return [_to_job(row, queue) for row in rows]

    def get(self, job_id: str) -> Job:
        """One job by id (a unique prefix of the id works too)."""
        self.recover()
        with self._db.connect() as db:
            row = db.execute(SELECT_JOBS + " WHERE jobs.id = ?", (self._full_id(db, job_id),)).fetchone()
            return _to_job(row, queue_positions(db))

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
            (state,) = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if state in FINISHED_STATES:
                raise JobError(f"job {job_id} already ended as {state}; there is nothing to cancel")
            placed = db.execute("SELECT submission_id FROM placements WHERE job_id = ?", (job_id,)).fetchone()
            if state == "running" or (
                state == "queued" and placed and placed[0]
            ):  # on a cluster: its own queue
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ? WHERE id = ?",
                    (time.time(), f"cancelled while {state}", job_id),
                )
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
            changed = db.execute(
                "UPDATE jobs SET state = 'queued', queued_at = ?, finished_at = NULL, error = NULL, "
                "cancel_requested = 0, resume = ?, trust_remote_code = ? WHERE id = ? AND state = ?",
                (time.time(), int(has_checkpoint), int(trust_remote_code), job.id, job.state),
            ).rowcount
            db.execute("UPDATE placements SET submission_id = NULL WHERE job_id = ?", (job.id,))
        if not changed:
            raise JobError(f"job {job.id} changed state while resuming it; look at it again with `jobs show`")
        return self.get(job.id)

    def recover(self) -> list[str]:
        """Mark running jobs whose process is gone (or, on another host, silent too long) interrupted.

        Returns their ids.
        """
        with self._db.connect() as db:
            rows = db.execute(
                "SELECT id, attempt, pid, host, heartbeat_at FROM jobs WHERE state = 'running'"
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
            self.finish(job.id, job.attempts, "failed", error=job.damaged)
        return job

    def _claim_one(self, worker_pid: int) -> Job | None:
        with self._db.transaction() as db:
            row = db.execute(
                f"SELECT id FROM jobs WHERE state = 'queued' AND {LOCAL} ORDER BY queued_at, seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute(
                "UPDATE jobs SET state = 'running', attempt = attempt + 1, started_at = "
                "COALESCE(started_at, ?), pid = ?, host = ?, heartbeat_at = ?, error = NULL WHERE id = ?",
                (now, worker_pid, socket.gethostname(), now, row[0]),
            )
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
                "SELECT attempt, state, cancel_requested FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        if row is None or row[0] != attempt or row[1] != "running":
            return "superseded"
        return "cancelled" if row[2] else None

    def finish(
        self,
        job_id: str,
        attempt: int,
        state: JobState,
        *,
        error: str | None = None,
        adapter_dir: Path | None = None,
    ) -> bool:
        """Record how an attempt ended; False if a newer attempt owns the job now."""
        with self._db.transaction() as db:
            return bool(
                db.execute(
                    "UPDATE jobs SET state = ?, error = ?, adapter_dir = ?, finished_at = ?, cancel_requested = 0 "
                    "WHERE id = ? AND attempt = ? AND state IN ('running', 'interrupted')",
                    (state, error, adapter_dir and str(adapter_dir), time.time(), job_id, attempt),
                ).rowcount
            )

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
                SELECT_JOBS
                + " WHERE placements.submission_id IS NOT NULL AND jobs.state IN ('queued', 'running')"
            ).fetchall()
        return [_to_job(row, {}) for row in rows]

    def dispatched(self, job_id: str, submission_id: str) -> int:
        """A queued job was handed to its cluster as `submission_id`: a new attempt (returned)."""
        with self._db.transaction() as db:
            db.execute("UPDATE jobs SET attempt = attempt + 1, error = NULL WHERE id = ?", (job_id,))
            db.execute("UPDATE placements SET submission_id = ? WHERE job_id = ?", (submission_id, job_id))
            return db.execute("SELECT attempt FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def settle(self, job_id: str, attempt: int, state: JobState, **result: Any) -> bool:
        """Record the state a cluster reports for an attempt (`result`: its error=, adapter_dir=);
        False if nothing changed."""
        ended = state in FINISHED_STATES or state == "interrupted"
        error, adapter = result.get("error"), result.get("adapter_dir")
        with self._db.transaction() as db:
            return settle_attempt(db, job_id, attempt, state, ended, error, adapter and str(adapter))

    # --- internals ----------------------------------------------------------------------------------
    def _end_attempt(self, job_id: str, attempt: int, why: str) -> bool:
        """A running attempt died: interrupted (resumable), or cancelled if that was asked for."""
        with self._db.transaction() as db:
            return bool(
                db.execute(
                    "UPDATE jobs SET state = CASE cancel_requested WHEN 1 THEN 'cancelled' ELSE 'interrupted' END, "
                    "error = ?, finished_at = ?, cancel_requested = 0 WHERE id = ? AND attempt = ? AND state = 'running'",
                    (f"interrupted: {why}", time.time(), job_id, attempt),
                ).rowcount
            )

    def _update(self, job_id: str, attempt: int, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._db.transaction() as db:
            db.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND attempt = ? AND state = 'running'",
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


def _to_job(row: sqlite3.Row, queue: dict[str, int]) -> Job:
    """The store's queue facts joined with its run folder's progress and metrics.

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
        id=str(r.get("id")), name=str(r.get("name")), state=r.get("state") if r.get("state") in JOB_STATES else "failed",
        recipe={}, run_dir=run_dir, created_at=number(r.get("created_at")) or 0.0,
        started_at=number(r.get("started_at")), finished_at=number(r.get("finished_at")), step=0,
        total_steps=None, eta_seconds=None, metrics={}, adapter_dir=None, error=why,
        log_path=run_dir / LOG_FILE, cancel_requested=False, attempts=number(r.get("attempt")) or 0,
        resumes_from_checkpoint=False, heartbeat_at=None, pid=None, queue_position=None, damaged=why,
    )  # fmt: skip


def _read_job(r: dict[str, Any], queue: dict[str, int]) -> Job:
    recipe = json.loads(r["recipe"])
    if not isinstance(recipe, dict) or r["state"] not in JOB_STATES:
        raise ValueError(
            "its recipe is not a JSON object" if not isinstance(recipe, dict) else "unknown state"
        )
    run_dir = Path(r["run_dir"])
    run = runs.read_run(run_dir)
    return Job(
        id=r["id"],
        name=r["name"],
        state=r["state"],
        recipe=recipe,
        run_dir=run_dir,
        created_at=r["created_at"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        step=run.step,
        total_steps=run.max_steps,
        eta_seconds=run.eta_seconds() if r["state"] == "running" else None,
        metrics=run.latest,
        adapter_dir=Path(r["adapter_dir"]) if r["adapter_dir"] else None,
        error=r["error"],
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
