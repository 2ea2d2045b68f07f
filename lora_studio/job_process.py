"""One job's process: `training.train` with a callback that stops it on request.

State, progress and metrics go to the run folder: training writes them through `runs`, and
`finish` records how the attempt ended there too (under the store's lock, for the current attempt).

The worker runs `python -m lora_studio.job_process --store PATH JOB_ID ATTEMPT`; without a job
the process loads the training libraries first and then waits for "JOB_ID ATTEMPT" on stdin
(the worker's spare, so the next job starts without the import delay). Everything the process
prints goes to the job's log.

Its writes to the run folder are fenced by the job's attempt (`JobStore.fence`): once a newer
attempt owns the job, this one writes neither status.json nor adapter/.

Stopping happens at a step boundary, after a checkpoint is saved: when the job is cancelled in
the store, or when the process gets SIGTERM/SIGINT (the worker stopping or dying). A second
signal, or one before training has begun, stops at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from .cluster import RunFolderJob
from .config import Recipe
from .errors import LoraStudioError, TrainingCancelled, TrainingInterrupted
from .jobs import HEARTBEAT_SECONDS, JobStore
from .remote_code import set_remote_code
from .training import train

log = logging.getLogger(__name__)


class StopOnRequest(TrainerCallback):
    """Ends training at the next step with a checkpoint when the job is cancelled or the process told to stop.

    It raises TrainingCancelled from on_save, i.e. after the Trainer wrote the checkpoint, so
    `train()` neither saves a final adapter nor records success.
    """

    def __init__(self, store: JobStore, job_id: str, attempt: int):
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.reason: str | None = None  # "cancelled" | "interrupted" | "superseded"
        self.in_loop = False

    def request(self, reason: str) -> None:
        """Ask for a stop (from a signal handler). A second request, or one before the loop, stops now."""
        if self.reason is not None or not self.in_loop:
            raise KeyboardInterrupt
        self.reason = reason

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.in_loop = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        # The store's word first: a cancel that also sent a signal (a Ray cluster's stop) is a cancel.
        self.reason = self.store.stop_reason(self.job_id, self.attempt) or self.reason
        if self.reason == "superseded":  # a newer attempt owns the run folder: write nothing more
            raise TrainingCancelled(f"job {self.job_id} attempt {self.attempt} was superseded")
        if self.reason:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.reason:
            stopped = TrainingInterrupted if self.reason == "interrupted" else TrainingCancelled
            raise stopped(
                f"{self.reason} at step {state.global_step} of {state.max_steps}; "
                f"checkpoint-{state.global_step} saved, `resume` continues from it"
            )


def run_job(store: JobStore | RunFolderJob, job_id: str, attempt: int, callbacks: Sequence[Any] = ()) -> None:
    """Train one attempt of a job and record how it ended (never raises for a training failure).

    `store` is the job store, or on a cluster node the run folder standing in for it (cluster.py),
    whose own `callbacks` (a mirror to object storage) go before the stopper, which raises.
    """
    job = store.get(job_id)
    set_remote_code(job.trust_remote_code)  # this job's own permission, never the environment's
    store.attempt_started(job_id, attempt, os.getpid())
    early = store.stop_reason(job_id, attempt)  # cancelled (or taken over) while it was being started
    if early is not None:
        if early == "cancelled":
            store.finish(job_id, attempt, "cancelled", error="cancelled before training began")
        return
    stopper = StopOnRequest(store, job_id, attempt)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopper.request("interrupted"))
    threading.Thread(target=_heartbeat, args=(store, job_id, attempt, stopper), daemon=True).start()
    log.info("job %s attempt %d: %s in process %d", job_id, attempt, job.name, os.getpid())
    recipe = Recipe.from_dict(job.recipe)
    fit = train if recipe.train.num_workers <= 1 else _distributed_train()
    try:
        fit(
            recipe,
            resume=job.resumes_from_checkpoint,
            callbacks=[*callbacks, stopper],
            fence=lambda: store.fence(job_id, attempt),  # a superseded attempt writes nothing more
        )
    except TrainingCancelled as e:
        # Several Ray Train workers stop in their own processes: then the stopper here saw nothing.
        reason = stopper.reason or store.stop_reason(job_id, attempt)
        if reason != "superseded" and store.stop_reason(job_id, attempt) != "superseded":
            store.finish(
                job_id, attempt, "cancelled" if reason == "cancelled" else "interrupted", error=str(e)
            )
    except KeyboardInterrupt:
        store.finish(job_id, attempt, "interrupted", error="stopped by a signal before the next checkpoint")
    except LoraStudioError as e:
        store.finish(job_id, attempt, "failed", error=str(e))
    except Exception as e:  # a bug or a library failure: keep the traceback in the job's log
        log.exception("job %s failed", job_id)
        store.finish(job_id, attempt, "failed", error=f"{type(e).__name__}: {e}")
    else:
        store.finish(job_id, attempt, "succeeded")
    log.info("job %s attempt %d ended: %s", job_id, attempt, store.get(job_id).state)


def _distributed_train() -> Any:
    from .ray_train import train_on_workers  # imports Ray: only for runs on several workers

    return train_on_workers


def _heartbeat(store: JobStore, job_id: str, attempt: int, stopper: StopOnRequest) -> None:
    """Say we are alive every few seconds; if the worker is gone, stop as if it had sent SIGTERM."""
    parent, orphaned = os.getppid(), False
    while True:
        time.sleep(HEARTBEAT_SECONDS)
        try:
            store.heartbeat(job_id, attempt)
        except Exception as e:  # a busy database must not kill the job; the next beat tries again
            log.warning("heartbeat failed: %s", e)
        # Re-parented: the worker died. On Linux the kernel has sent SIGTERM (PR_SET_PDEATHSIG); elsewhere
        # send it ourselves, once, and not on top of a stop under way (a second signal stops abruptly).
        if os.getppid() != parent and not orphaned and not sys.platform.startswith("linux"):
            orphaned = True
            if stopper.reason is None:
                os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_studio.job_process")
    parser.add_argument("--store", help="the job store (this machine's worker)")
    parser.add_argument(
        "--run-dir", help="instead of a store: the run folder, on a cluster node (cluster.py)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="with --run-dir: continue from its last checkpoint"
    )
    parser.add_argument("job", nargs="*", metavar="JOB_ID ATTEMPT")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.run_dir:  # on a cluster: the cluster reports how it ended, from the exit code
        folder = RunFolderJob(args.run_dir, args.resume)
        run_job(folder, args.job[0], int(args.job[1]), folder.callbacks())
        return folder.exit_code()
    if not args.job:  # the spare: libraries are loaded, wait for a job
        line = sys.stdin.readline().split()
        if len(line) != 2:
            return 0  # the worker went away or let us go
        args.job = line
        store = JobStore(args.store)
        with open(store.get(line[0]).log_path, "ab") as f:  # from now on, print into the job's log
            os.dup2(f.fileno(), sys.stdout.fileno())
            os.dup2(f.fileno(), sys.stderr.fileno())
    run_job(JobStore(args.store), args.job[0], int(args.job[1]))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    # The result is recorded and every file closed: skip tearing torch & co. down (seconds), so the
    # worker can start the next job sooner.
    os._exit(code)
