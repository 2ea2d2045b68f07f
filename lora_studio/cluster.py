"""Where a job runs: this machine's worker, or a Ray cluster. The executor seam.

    placement = cluster.Placement("ray", "http://HEAD:8265", storage=Path("/shared/runs"))
    job_id = store.submit(recipe, placement=placement)   # queued, recorded as the cluster's
    cluster.start(store, job_id)                          # hands it to its executor
    store.get(job_id)                                     # state as the cluster reports it

An `Executor` submits a queued job, reports its state, reads its log and stops it. The local one
is the worker beside the store (worker.py); `RayExecutor` is Ray's Job Submission API. Both run
the same command, `python -m lora_studio.job_process`, so a job on a cluster is the same code
path as one here. On a cluster it is given its run folder instead of the store
(`--run-dir`, `RunFolderJob` below): the store lives on the submitting machine, the run folder on
storage that every node sees.

The job store stays the user's record: queue facts, attempts, where a job runs. Ray keeps none of
that for us (Ray Jobs does not retry), so `jobs resume` submits a new attempt, which continues from
the run folder's last whole checkpoint. Ray's states map one to one: PENDING -> queued, RUNNING ->
running, SUCCEEDED -> succeeded, STOPPED -> cancelled, FAILED -> failed or cancelled as the job
process's exit code says, else interrupted (the process was killed, or lost with its node): resumable.
A cancel writes the run folder's cancel file: the job checkpoints at its next step and exits as
cancelled; Ray's stop is used before it starts, or on a second cancel (then at once).
Where Ray gives a state we trust it: no heartbeats, no scheduling, no SSH of our own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import runs
from . import storage as storage_uris
from .config import Recipe
from .errors import ConfigError, JobError, LoraStudioError
from .job_record import FINISHED_STATES, Job, JobState


class JobStore(Protocol):
    """What a place that runs jobs needs of the queue (jobs.JobStore), which hands jobs over to it."""

    home: Path

    def get(self, job_id: str) -> Job: ...
    def ensure_worker(self) -> int | None: ...
    def worker_pid(self) -> int | None: ...
    def placed_jobs(self) -> list[Job]: ...
    def dispatched(self, job_id: str, submission_id: str) -> int: ...
    def settle(self, job_id: str, attempt: int, state: JobState, **result: Any) -> bool: ...


log = logging.getLogger(__name__)

CLUSTERS = ("local", "ray")
DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"
JOB_FILE = "job.json"  # the recipe, for a job process that cannot read the store
CANCEL_FILE = "cancel-requested"  # written by `cancel`: the job stops at its next step as cancelled
STOP_WAIT_SECONDS = 600  # Ray's SIGTERM-to-SIGKILL grace on stop: time to finish a step and checkpoint
_RAY_STATES: dict[str, str] = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded"}
_EXIT_CODES = {"succeeded": 0, "failed": 1, "interrupted": 3, "cancelled": 4}  # a job process's, on a cluster
_EXIT_STATES = {code: state for state, code in _EXIT_CODES.items()}


@dataclass(frozen=True)
class Placement:
    """Where a submitted job runs: a cluster, its address, and the storage its run folder lives on."""

    cluster: str  # "ray"
    address: str
    # A folder every node sees; for s3:// or gs:// storage, its face here (storage.py); None: the studio home.
    storage: Path | None = None


def ray_placement(address: str | None = None, storage: str | Path | None = None) -> Placement:
    """A Ray placement from `--address` (else RAY_ADDRESS, else the local head) and `--storage`."""
    require_ray()
    return Placement(
        "ray", address or os.environ.get("RAY_ADDRESS") or DEFAULT_RAY_ADDRESS, _storage(storage)
    )


def _storage(storage: str | Path | None) -> Path | None:
    if storage is None or str(storage) == "":
        return None
    text = str(storage)
    if storage_uris.is_uri(text):  # s3://, gs://: the run folders' face on this machine stands for it
        return storage_uris.face_root(text)
    path = Path(text).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_ray() -> None:
    """One line saying what to install when Ray is missing."""
    try:
        import ray.job_submission  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--cluster ray needs Ray, which is not installed: pip install 'lora-studio[ray]' "
            "(or pip install 'ray[default]')"
        ) from None


# --- the seam ------------------------------------------------------------------------------------
class Executor(Protocol):
    """Runs queued jobs somewhere; the store keeps their record."""

    def submit(self, store: JobStore, job: Job) -> str:
        """Start (or hand over) a queued job; returns a line saying where it went."""

    def state(self, job: Job) -> tuple[JobState, str | None] | None:
        """The job's state and error as this executor knows it; None: nothing new to say."""

    def read_log(self, job: Job, offset: int) -> tuple[str, int]:
        """The job's log from byte `offset` on, and the offset to pass next time."""

    def stop(self, job: Job) -> None:
        """Stop a running job at its next step, with a checkpoint (the store already marked the cancel)."""


class LocalExecutor:
    """This machine's worker (worker.py): it claims queued jobs from the store and reports through it."""

    def submit(self, store: JobStore, job: Job) -> str:
        started = store.ensure_worker()
        return f"worker started (pid {started})" if started else f"worker running (pid {store.worker_pid()})"

    def state(self, job: Job) -> tuple[JobState, str | None] | None:
        return None  # the job process writes its state into its run folder itself

    def read_log(self, job: Job, offset: int) -> tuple[str, int]:
        if not job.log_path.is_file():
            return "", offset
        with open(job.log_path, "rb") as f:
            f.seek(offset)
            data = f.read()
        return data.decode("utf-8", errors="replace"), offset + len(data)

    def stop(self, job: Job) -> None:
        pass  # the job process reads the cancel flag from the store at every step


class RayExecutor:
    """A Ray cluster, through its Job Submission API (the dashboard address, e.g. http://HEAD:8265)."""

    def __init__(self, address: str):
        self.address = address

    def submit(self, store: JobStore, job: Job) -> str:
        submission_id = f"lora-studio-{job.id}-{job.attempts + 1}"
        client = self._client()
        attempt = store.dispatched(job.id, submission_id)
        recipe = Recipe.from_dict(job.recipe)
        try:
            run_dir = _hand_over_run_folder(job, recipe)
        except LoraStudioError as e:
            store.settle(job.id, attempt, "failed", error=str(e))
            raise
        # The index on this machine points at the run folder (or its face), so `chat NAME` & co. find it.
        runs.register(job.run_dir, job.id, job.name, recipe.model.base_model, recipe.task, job.created_at)
        cmd = ["python", "-m", "lora_studio.job_process", "--run-dir", run_dir]
        cmd += ["--resume"] if job.resumes_from_checkpoint else []
        workers = recipe.train.num_workers
        try:
            client.submit_job(
                entrypoint=shlex.join([*cmd, job.id, str(attempt)]),
                submission_id=submission_id,
                # Several workers: Ray Train places them; the driver itself needs no CPU of its own.
                entrypoint_num_cpus=0 if workers > 1 else 1,
                runtime_env={"env_vars": _job_env()},
                metadata={"lora_studio_job": job.id, "name": job.name},
            )
        except Exception as e:
            store.settle(
                job.id, attempt, "failed", error=f"the Ray cluster at {self.address} refused it: {e}"
            )
            raise JobError(
                f"could not submit job {job.id} to the Ray cluster at {self.address}: {e}"
            ) from None
        return f"submitted to the Ray cluster at {self.address} as {submission_id}"

    def state(self, job: Job) -> tuple[JobState, str | None] | None:
        try:
            info = self._client().get_job_info(job.submission_id)
        except LoraStudioError as e:
            log.warning("%s", e)
            return None
        except RuntimeError as e:  # the cluster answered: it does not know this submission
            if "does not exist" not in str(e):
                raise
            return "interrupted", (
                f"interrupted: the Ray cluster at {self.address} no longer knows {job.submission_id} "
                "(restarted?); `jobs resume` continues from the last checkpoint"
            )
        ray_state = str(info.status.value if hasattr(info.status, "value") else info.status)
        if ray_state == "STOPPED":
            return "cancelled", "cancelled on the Ray cluster"
        if ray_state != "FAILED":
            return _RAY_STATES[ray_state], None  # type: ignore[return-value]
        # How the job process ended (RunFolderJob.exit_code), else the run folder's word; a process
        # killed, or lost with its node, said neither: interrupted, resumable.
        status = runs.read_status(job.run_dir)
        ended = _EXIT_STATES.get(info.driver_exit_code) or status.get("state")
        if ended in ("failed", "cancelled"):
            return ended, status.get("error") or _first_line(info.message)
        return "interrupted", f"interrupted on the Ray cluster: {_first_line(info.message)}"

    def read_log(self, job: Job, offset: int) -> tuple[str, int]:
        """Every attempt's log, as Ray kept it (an attempt the cluster forgot is left out)."""
        parts = []
        for attempt in range(1, job.attempts + 1):
            with contextlib.suppress(RuntimeError):
                parts.append(self._client().get_job_logs(f"lora-studio-{job.id}-{attempt}"))
        data = "".join(parts).encode()[offset:]
        return data.decode("utf-8", errors="replace"), offset + len(data)

    def stop(self, job: Job) -> None:
        """A running job reads the cancel file at its next step, checkpoints and exits as cancelled.

        Ray's own stop (SIGTERM, then SIGKILL) is for a job not started yet, or a second cancel:
        a signal on top of a stop under way ends the job at once, as a second Ctrl-C does locally.
        """
        if job.submission_id is None:
            return
        again = _request_cancel(job.run_dir)
        try:
            if again or self._client().get_job_status(job.submission_id) == "PENDING":
                self._client().stop_job(job.submission_id)
        except RuntimeError as e:
            log.warning("the Ray cluster could not stop %s: %s", job.submission_id, e)

    def _client(self) -> Any:
        return _ray_client(self.address)


def _hand_over_run_folder(job: Job, recipe: Recipe) -> str:
    """Put the job's spec where its node reads it, with no cancel left over; returns the run folder
    as the node sees it: a shared path, or the URI of a run on object storage (storage.py)."""
    spec = json.dumps({"id": job.id, "name": job.name, "recipe": job.recipe})
    uri = storage_uris.uri_of_face(job.run_dir)
    if uri is None:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / CANCEL_FILE).unlink(missing_ok=True)
        (job.run_dir / JOB_FILE).write_text(spec)
        return str(job.run_dir)
    if recipe.train.num_workers > 1:
        raise ConfigError(
            f"train.num_workers: {recipe.train.num_workers} with object storage ({uri}) is not supported "
            "yet: give --storage a folder every node sees, or train on one worker"
        )
    remote = storage_uris.Remote(uri)
    with contextlib.suppress(FileNotFoundError):
        remote.delete(CANCEL_FILE)
    remote.write_bytes(JOB_FILE, spec.encode())
    storage_uris.link(job.run_dir, uri)  # the face: this machine's copy of the small files
    return uri


def _request_cancel(run_dir: Path) -> bool:
    """Write the cancel request where the job process looks; True if one was there already (or
    it could not be written: then only Ray's stop is left)."""
    uri = storage_uris.remote_of(run_dir)
    try:
        if uri is None:
            again = (run_dir / CANCEL_FILE).exists()
            (run_dir / CANCEL_FILE).write_text("cancelled")
            return again
        remote = storage_uris.Remote(uri)
        again = remote.exists(CANCEL_FILE)
        remote.write_bytes(CANCEL_FILE, b"cancelled")
        return again
    except (OSError, LoraStudioError) as e:
        log.warning("cannot write the cancel request for %s: %s", run_dir, e)
        return True


_clients: dict[str, Any] = {}


def _ray_client(address: str) -> Any:
    """One JobSubmissionClient per address and process (making one asks the cluster for its version)."""
    if address not in _clients:
        require_ray()
        from ray.job_submission import JobSubmissionClient

        try:
            _clients[address] = JobSubmissionClient(address)
        except Exception as e:  # ConnectionError, AuthenticationError, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = (
                "; the cluster wants its token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                "~/.ray/auth_token)"
                if "uthentication" in str(e)
                else "; is its head running (`ray start --head`) and the dashboard port (8265) open?"
            )
            raise JobError(f"cannot reach the Ray cluster at {address}: {first}{hint}") from None
    return _clients[address]


def _first_line(message: str | None) -> str:
    lines = (message or "").strip().splitlines()
    return lines[0] if lines else "it ended without a word"


def _job_env() -> dict[str, str]:
    env = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_SECONDS), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    env.update({k: v for k, v in os.environ.items() if k in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN")})
    return env


# --- what the store calls ----------------------------------------------------------------------------
def executor_for(job: Job) -> Executor:
    if job.cluster == "ray":
        return RayExecutor(job.cluster_address or DEFAULT_RAY_ADDRESS)
    if job.cluster:
        raise JobError(f"job {job.id} runs on a {job.cluster!r} cluster; this version knows {CLUSTERS}")
    return LocalExecutor()


def start(store: JobStore, job_id: str) -> str:
    """Hand a queued job to whatever runs it; returns a line saying where it went."""
    job = store.get(job_id)
    return executor_for(job).submit(store, job)


def sync(store: JobStore) -> list[str]:
    """Record what each cluster says about its jobs; returns the ids that became interrupted."""
    lost = []
    for job in store.placed_jobs():
        try:
            seen = executor_for(job).state(job)
        except LoraStudioError as e:
            log.warning("job %s: %s", job.id, e)
            continue
        if seen is None:
            continue
        state, error = seen  # an end is recorded in its run folder; running is the job process's to say
        if state in (*FINISHED_STATES, "interrupted"):
            storage_uris.refresh(job.run_dir, force=True)  # on object storage: its copy here, as it ended
        if store.settle(job.id, job.attempts, state, error=error) and state == "interrupted":
            lost.append(job.id)
    return lost


# --- the job process on a cluster node (job_process.py --run-dir) -------------------------------------
@dataclass
class _Spec:
    name: str
    recipe: dict[str, Any]
    resumes_from_checkpoint: bool
    state: str  # "running" until this attempt ended
    trust_remote_code: bool = False  # never on a cluster: refused at submit (jobs.submit)


class RunFolderJob:
    """What a job process on a cluster node sees of its job: the run folder, not the store.

    It stands in for the JobStore in `job_process.run_job`: the cluster keeps the job's state,
    the run folder its progress, and a cancel is the cancel file plus the cluster's SIGTERM.
    `outcome` is how the attempt ended, for the process's exit code (which the cluster reports).
    """

    def __init__(self, run_dir: str | Path, resume: bool):
        self.resume, self.mirror = resume, None
        if storage_uris.is_uri(run_dir):  # on object storage: trained in a local copy, mirrored up
            from .run_mirror import RunMirror  # imports transformers: a job process has it loaded

            self.mirror = RunMirror(str(run_dir), resume)
        self.run_dir = self.mirror.scratch if self.mirror else Path(run_dir)
        self.outcome: str | None = None
        self._spec: dict[str, Any] | None = None

    def get(self, job_id: str) -> _Spec:
        if self._spec is None:  # read once: a mirror's scratch copy is gone once it ended
            self._spec = json.loads((self.run_dir / JOB_FILE).read_text())
        spec = self._spec
        recipe = spec["recipe"]
        if self.mirror:  # the scratch copy stands for the run folder on this node
            recipe = {**recipe, "train": {**recipe["train"], "output_dir": str(self.run_dir)}}
        return _Spec(spec["name"], recipe, self.resume, self.outcome or "running")

    def callbacks(self) -> list[Any]:
        """The job's own training callbacks: the mirror's, for a run on object storage."""
        return [self.mirror.callback()] if self.mirror else []

    def attempt_started(self, job_id: str, attempt: int, pid: int) -> None:
        pass

    def heartbeat(self, job_id: str, attempt: int) -> None:
        pass  # the cluster watches its processes

    def stop_reason(self, job_id: str, attempt: int) -> str | None:
        if self.mirror:
            return "cancelled" if self.mirror.cancel_requested(CANCEL_FILE) else None
        return "cancelled" if (self.run_dir / CANCEL_FILE).exists() else None

    @contextlib.contextmanager
    def fence(self, job_id: str, attempt: int) -> Iterator[None]:
        yield  # one attempt at a time: `resume` needs the cluster to have ended the last one

    def finish(self, job_id: str, attempt: int, state: str, *, error: str | None = None) -> bool:
        self.outcome = state
        runs.write_status(self.run_dir, state, error=error)  # the run folder is the job's record
        if self.mirror:  # what is left, the adapter, then status.json: the bucket's word on how it ended
            self.mirror.push(final=True)
            self.mirror.close()
        return True

    def exit_code(self) -> int:
        """0 only for success, so the cluster reports SUCCEEDED or FAILED as it should."""
        return _EXIT_CODES.get(self.outcome or "", 1)
