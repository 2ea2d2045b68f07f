"""The worker: takes queued jobs first in, first out and runs each in its own process.

    lora-studio worker [--concurrency N] [--idle-exit SECONDS]

One worker serves a store (an OS file lock makes a second one exit at once); `ensure_worker`
starts one in the background when none is running, and `process_alive` tells the store whether
a worker or job process is still alive on this host. It never imports
torch itself: every job runs in a child process (`lora_studio.job_process`), so a job that
crashes, runs out of memory or is killed cannot take the worker down, and the worker records
it as interrupted the moment it sees the process gone. To hide the seconds it takes to import
the training libraries, the worker keeps one spare child that has them loaded and waits for a job.

On SIGTERM or Ctrl-C the worker asks its jobs to stop at their next step (each saves a
checkpoint and ends interrupted, resumable without loss), waits up to `stop_timeout` seconds,
then kills what is left. If the worker itself is killed, the kernel sends its jobs SIGTERM
(Linux), with the same result.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from .errors import ConfigError
from .jobs import Job, JobStore
from .remote_code import without_permission
from .worker_launch import lock_path, worker_lock

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class _Running:
    proc: subprocess.Popen
    attempt: int


def run_worker(
    store: JobStore,
    *,
    concurrency: int = 1,
    poll_seconds: float = 0.5,
    idle_exit_seconds: float | None = None,
    stop_timeout: float = 60.0,
    prestart: bool = True,
) -> int:
    """Serve the store's queue until stopped (or idle for `idle_exit_seconds`); returns an exit code."""
    if concurrency < 1:
        raise ConfigError(f"concurrency: expected at least 1 job at a time, got {concurrency}")
    stop = _install_stop_handlers()
    while True:
        with worker_lock(store) as held:
            if not held:
                log.info(
                    "a worker already serves %s (pid %s); not starting another",
                    store.path,
                    store.worker_pid(),
                )
                return 0
            lock_path(store).write_text(str(os.getpid()))
            log.info("worker %d serving %s, %d job(s) at a time", os.getpid(), store.path, concurrency)
            _serve(store, stop, concurrency, poll_seconds, idle_exit_seconds, stop_timeout, prestart)
        # The lock is released. A job submitted a moment ago saw it held and started no worker,
        # so look once more before leaving; if there is one, take the lock again (or let a new worker have it).
        if stop or not store.has_queued():
            log.info("worker %d exits", os.getpid())
            return 0


def _serve(
    store: JobStore,
    stop: list[int],
    concurrency: int,
    poll_seconds: float,
    idle_exit_seconds: float | None,
    stop_timeout: float,
    prestart: bool,
) -> None:
    running: dict[str, _Running] = {}
    spare: subprocess.Popen | None = None
    idle_since, stop_deadline = time.monotonic(), None
    try:
        while True:
            for job_id, r in list(running.items()):
                code = r.proc.poll()
                if code is not None:
                    store.process_exited(job_id, r.attempt, code)  # no-op when the job recorded its end
                    log.info(
                        "job %s process %d exited (%d); now %s",
                        job_id,
                        r.proc.pid,
                        code,
                        store.get(job_id).state,
                    )
                    del running[job_id]
            if stop:
                if stop_deadline is None:
                    log.info("stopping: asking %d job(s) to checkpoint and stop", len(running))
                    stop_deadline = time.monotonic() + stop_timeout
                    for r in running.values():
                        r.proc.send_signal(signal.SIGTERM)
                elif time.monotonic() > stop_deadline:
                    for r in running.values():
                        r.proc.kill()
                if not running:
                    return
            else:
                store.recover()
                while len(running) < concurrency and (job := store.claim_next(os.getpid())) is not None:
                    running[job.id], spare = _start(store, job, spare, prestart)
                if running:
                    idle_since = time.monotonic()
                elif idle_exit_seconds is not None and time.monotonic() - idle_since > idle_exit_seconds:
                    return
                if prestart and spare is not None and spare.poll() not in (None, 0):
                    # It could not even load the libraries; do not respawn it in a loop (jobs will show why).
                    log.warning(
                        "the waiting job process exited with %s; starting jobs without one", spare.returncode
                    )
                    prestart, spare = False, None
                if prestart and (spare is None or spare.poll() is not None):
                    spare = _spawn(store, None, stdout=None)
            time.sleep(poll_seconds)
    finally:
        if spare is not None and spare.poll() is None:
            spare.kill()
            spare.wait()


def _start(
    store: JobStore,
    job: Job,
    spare: subprocess.Popen | None,
    prestart: bool,
) -> tuple[_Running, subprocess.Popen | None]:
    """Run a claimed job in the spare process if one is waiting, else in a new one."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    how = "continuing from its last checkpoint" if job.resumes_from_checkpoint else "from step 0"
    with open(job.log_path, "ab") as f:
        f.write(
            f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {job.attempts} of job {job.id} ({job.name}), "
            f"{how}\n".encode()
        )
    if spare is not None and spare.poll() is None:
        try:
            spare.stdin.write(f"{job.id} {job.attempts}\n".encode())
            spare.stdin.close()
            log.info("job %s started in waiting process %d", job.id, spare.pid)
            return _Running(spare, job.attempts), None
        except OSError:  # it died just now: start a fresh one below
            pass
    with open(job.log_path, "ab") as f:
        proc = _spawn(store, job, stdout=f)
    log.info("job %s started in process %d", job.id, proc.pid)
    return _Running(proc, job.attempts), spare if prestart else None


def _spawn(store: JobStore, job: Job | None, stdout: IO[bytes] | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lora_studio.job_process", "--store", str(store.path)]
    if job is not None:
        cmd += [job.id, str(job.attempts)]
    # No progress bars in logs; logs written as they happen. Never remote code from the worker's
    # environment: a job process takes that permission from its own job's record (remote_code.py).
    env = {**without_permission(os.environ), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if job is None else subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout else None,
        cwd=store.home,
        env=env,
        preexec_fn=_child_setup,
    )


def _child_setup() -> None:
    """In the job process before it starts: its own process group (a Ctrl-C reaches it once, through
    the worker), and a SIGTERM from the kernel if the worker dies (Linux)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _install_stop_handlers() -> list[int]:
    """SIGTERM/SIGINT append to the returned list (truthy = stop), so the loop can wind down cleanly."""
    stop: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
