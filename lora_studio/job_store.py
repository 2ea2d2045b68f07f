"""The job store's SQLite file: its schema, connections and transactions.

A damaged file (not a database, pages overwritten, truncated) becomes one JobError that says what
is wrong and how to start afresh, never a sqlite3 traceback.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from . import runs
from .errors import JobError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,     -- submission order
    id TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL,
    queue TEXT NOT NULL,                       -- queued | taken (an attempt holds it) | done; the job's
                                               -- state is its run folder's status.json (runs.py)
    recipe TEXT NOT NULL,                      -- the resolved recipe as JSON, paths absolute
    run_dir TEXT NOT NULL,
    created_at REAL NOT NULL,
    queued_at REAL NOT NULL,                   -- first in, first out by this (resume re-queues)
    started_at REAL,                           -- first taken
    resume INTEGER NOT NULL DEFAULT 0,         -- the next run continues from the last checkpoint
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,        -- bumped by every claim
    pid INTEGER,
    host TEXT,
    heartbeat_at REAL,
    trust_remote_code INTEGER NOT NULL DEFAULT 0  -- the operator's word at submit/resume, this job's alone
);
CREATE TABLE IF NOT EXISTS placements (       -- jobs that run on a cluster (cluster.py); none: this machine
    job_id TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,                     -- "ray"
    address TEXT NOT NULL,                     -- e.g. http://HEAD:8265
    submission_id TEXT                         -- the cluster's id of the current attempt
);
"""
QUEUE = ("queued", "taken", "done")
# Columns added since the first schema, for stores made before them: name -> definition.
ADDED_COLUMNS = {"trust_remote_code": "INTEGER NOT NULL DEFAULT 0"}
# Queue facts only: a job's state, error, progress and metrics are in its run folder (runs.py). A
# store made before that keeps its old columns (adapter_dir, error, progress) and metrics table, unused.


class Database:
    """One SQLite file in WAL mode, shared by threads and processes: a connection per call."""

    def __init__(self, path: Path):
        self.path = path
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, definition in ADDED_COLUMNS.items():
                if name not in have:
                    with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
        if "state" in have:
            self._move_states_to_run_folders()

    def _move_states_to_run_folders(self) -> None:
        """A store from before run folders owned the state: write each ended job's state into its
        status.json, then keep only the queue fact (once; another process may have done it first)."""
        with self.transaction() as db:
            if "state" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}:
                return
            for run_dir, state, error in db.execute(
                "SELECT run_dir, state, error FROM jobs WHERE state NOT IN ('queued', 'running')"
            ).fetchall():
                if runs.read_status(Path(run_dir)).get("state") != state and state in runs.STATES:
                    with contextlib.suppress(OSError):  # a folder gone or unwritable: it reads as failed
                        runs.write_status(Path(run_dir), state, error=error)
            db.execute("ALTER TABLE jobs RENAME COLUMN state TO queue")
            db.execute(
                "UPDATE jobs SET queue = CASE queue WHEN 'queued' THEN 'queued' "
                "WHEN 'running' THEN 'taken' ELSE 'done' END"
            )

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: callers may be threads (the web UI) or separate processes.
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            try:
                db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across process crashes
                yield db
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                raise  # a bug in this module, not a problem with the file
            raise _store_error(self.path, e) from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


# The local worker's jobs: those not placed on a cluster (a cluster queues and runs its own).
LOCAL = "id NOT IN (SELECT job_id FROM placements)"
# A job row with where it runs (NULL columns for this machine).
SELECT_JOBS = (
    "SELECT jobs.*, placements.cluster, placements.address, placements.submission_id "
    "FROM jobs LEFT JOIN placements ON placements.job_id = jobs.id"
)


def is_current(db: sqlite3.Connection, job_id: str, attempt: int) -> bool:
    """Whether `attempt` is the job's latest attempt and still holds it."""
    row = db.execute(
        "SELECT 1 FROM jobs WHERE id = ? AND attempt = ? AND queue = 'taken'", (job_id, attempt)
    ).fetchone()
    return row is not None


def queue_positions(db: sqlite3.Connection) -> dict[str, int]:
    """Job id -> place in the queue (1 = next to start), for queued jobs."""
    rows = db.execute(
        f"SELECT id FROM jobs WHERE queue = 'queued' AND {LOCAL} ORDER BY queued_at, seq"
    ).fetchall()
    return {r[0]: i + 1 for i, r in enumerate(rows)}


def _store_error(path: Path, e: sqlite3.Error) -> JobError:
    """One line for the person at the keyboard: what is wrong with jobs.sqlite and what to do."""
    text = str(e)
    if "locked" in text or "busy" in text:
        return JobError(f"the job store {path} stayed busy for 30 s ({text}); try again in a moment")
    if "unable to open" in text:
        return JobError(
            f"cannot open the job store {path} ({text}); check that its folder exists and is "
            "writable, or point LORA_STUDIO_HOME elsewhere"
        )
    return JobError(
        f"the job store {path} is damaged ({text}); move it aside together with its -wal and -shm "
        f"files (e.g. `mkdir {path.parent}/damaged && mv {path}* {path.parent}/damaged/`) and a fresh, "
        f"empty store is made on the next start; run folders under {path.parent / 'runs'} are kept"
    )
