"""`lora-studio jobs ...` and `lora-studio worker`: the training queue from a terminal.

lora-studio jobs submit recipes/smollm2-lora-cpu.yaml --set max_steps=50   # last line: the job id
lora-studio jobs list
lora-studio jobs show ID          lora-studio jobs logs ID --follow
lora-studio jobs cancel ID        lora-studio jobs resume ID
lora-studio worker                # the long-running worker (`submit` starts one if none is running)
lora-studio jobs submit RECIPE --cluster ray --address http://HEAD:8265 --storage /shared/runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .. import cluster, storage
from ..config import add_set_argument
from ..evaluation.overfit import warning_lines
from ..jobs import JOB_STATES, Job, JobStore
from ..remote_code import remote_code_allowed
from ..runs import read_status
from ..text_checks import printable
from . import add_remote_code_flag, add_threads_flag
from .options import duration, num, when


def register(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="submit training jobs to the queue and watch, cancel or resume them")
    cmds = jobs.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND", required=True)

    p = cmds.add_parser("submit", help="check a recipe and queue it; prints the job id on the last line")
    p.add_argument("recipe", help="a YAML recipe, e.g. recipes/smollm2-lora-cpu.yaml")
    add_set_argument(p)
    p.add_argument("--no-worker", action="store_true", help="only queue it; do not start a worker")
    p.add_argument(
        "--cluster",
        choices=cluster.CLUSTERS,
        default="local",
        help="where it runs: this machine's worker (local, the default) or a Ray cluster (ray)",
    )
    p.add_argument(
        "--address",
        default=None,
        help=f"the Ray cluster's dashboard address (default: $RAY_ADDRESS, else {cluster.DEFAULT_RAY_ADDRESS})",
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="PATH",
        help="with --cluster ray: a folder every node sees; the run folder goes under it (default: the studio home)",
    )
    add_remote_code_flag(p)
    p.set_defaults(run=run_submit)

    p = cmds.add_parser("list", help="jobs, newest first")
    p.add_argument(
        "--state", action="append", choices=JOB_STATES, help="only jobs in this state (repeatable)"
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_list)

    p = cmds.add_parser("show", help="a job's state, progress and metrics")
    p.add_argument("job_id", help="a job id (a unique prefix is enough)")
    p.add_argument("--json", action="store_true", help="print the job and all its metrics rows as JSON")
    p.set_defaults(run=run_show)

    p = cmds.add_parser("logs", help="print a job's log")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job stops running")
    p.set_defaults(run=run_logs)

    p = cmds.add_parser(
        "cancel", help="cancel a job (a running one stops at its next step, with a checkpoint)"
    )
    p.add_argument("job_id")
    p.set_defaults(run=run_cancel)

    p = cmds.add_parser(
        "resume", help="queue an interrupted, cancelled or failed job again, from its last checkpoint"
    )
    p.add_argument("job_id")
    p.add_argument(
        "--restart", action="store_true", help="start over from step 0 if its checkpoints are gone"
    )
    p.add_argument("--no-worker", action="store_true", help="only queue it; do not start a worker")
    add_remote_code_flag(p)
    p.set_defaults(run=run_resume)

    p = sub.add_parser("worker", help="run queued training jobs (long-running; one worker per studio home)")
    p.add_argument("--concurrency", type=int, default=1, help="jobs run at the same time (default 1)")
    p.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this long with nothing to do (default: run until stopped)",
    )
    p.add_argument(
        "--poll", type=float, default=0.5, metavar="SECONDS", help="how often to look at the queue"
    )
    p.add_argument(
        "--no-prestart",
        action="store_true",
        help="do not keep a process with the training libraries loaded waiting for the next job",
    )
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        help="the job store file (default: <LORA_STUDIO_HOME>/jobs.sqlite)",
    )
    add_threads_flag(p, "each job")
    # No --trust-remote-code here: each job carries its own, given at `jobs submit`/`resume`.
    p.set_defaults(run=run_worker_command)


def run_submit(args: argparse.Namespace) -> int:
    store = JobStore()
    placement = None
    if args.cluster == "ray":
        placement = cluster.ray_placement(args.address or os.environ.get("RAY_ADDRESS"), args.storage)
    elif args.address or args.storage:
        raise cluster.ConfigError("--address and --storage go with --cluster ray")
    job_id = store.submit(
        args.recipe, args.overrides, trust_remote_code=remote_code_allowed(), placement=placement
    )
    job = store.get(job_id)
    where = "not started (--no-worker)" if args.no_worker else cluster.start(store, job_id)
    place = f"position {job.queue_position}" if job.queue_position else job.where
    print(f"queued {job.name} as job {job_id} ({place}); {where}")
    uri = storage.remote_of(job.run_dir)
    print(f"run folder: {uri} (its copy here: {job.run_dir})" if uri else f"run folder: {job.run_dir}")
    print(f"follow it:  lora-studio jobs logs {job_id} --follow")
    print(job_id)
    return 0


def _adapter_line(job: Job, uri: str | None) -> str | None:
    if uri and job.state == "succeeded":  # on object storage: fetched by the run's name
        return f"{uri}/adapter (`lora-studio chat {job.name}` downloads it once)"
    return str(job.adapter_dir) if job.adapter_dir else None


def run_list(args: argparse.Namespace) -> int:
    jobs = JobStore().list(args.state, args.limit)
    if args.json:
        print(json.dumps([j.to_dict() for j in jobs], indent=2))
        return 0
    if not jobs:
        print("no jobs yet: `lora-studio jobs submit RECIPE` queues one")
        return 0
    print(
        f"{'ID':<11} {'NAME':<20} {'STATE':<12} {'PROGRESS':<16} {'ETA':>8} {'LOSS':>8} {'VAL':>8}  CREATED"
    )
    for j in jobs:
        print(
            f"{printable(j.id):<11} {printable(j.name)[:20]:<20} {'damaged' if j.damaged else j.state:<12} {_progress(j):<16} {duration(j.eta_seconds):>8} "
            f"{num(j.metrics.get('loss')):>8} {num(j.metrics.get('val_loss')):>8}  {when(j.created_at)}"
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    store = JobStore()
    job = store.get(args.job_id)
    rows = store.metrics(job.id)
    if args.json:
        print(json.dumps({**job.to_dict(), "metrics_rows": rows}, indent=2, default=str))
        return 0
    cancel = " (cancel requested)" if job.cancel_requested else ""
    uri = storage.remote_of(job.run_dir)
    print(printable(f"job {job.id}: {job.name}, {'damaged' if job.damaged else job.state}") + cancel)
    details = {
        "progress": _progress(job)
        + (f", ETA {duration(job.eta_seconds)}" if job.eta_seconds is not None else ""),
        "queue": f"position {job.queue_position}" if job.queue_position else None,
        "created": when(job.created_at),
        "started": when(job.started_at),
        "finished": when(job.finished_at),
        "attempts": str(job.attempts),
        "runs on": job.where + (f" ({job.submission_id})" if job.submission_id else ""),
        "run folder": str(job.run_dir),
        "storage": uri,  # a run on object storage: `run folder` is its copy here (storage.py)
        "log": str(job.log_path),
        "adapter": _adapter_line(job, uri),
        "error": job.error,
        "warnings": "\n              ".join(warning_lines(job.run_dir)) or None,  # overfit.py's alarms
        "threads": (read_status(job.run_dir).get("threads") or {}).get("why"),  # thread_tuning.py
        "metrics": "  ".join(f"{k}={num(v)}" for k, v in job.metrics.items()) or None,
    }
    for key, value in details.items():
        if value:
            print(f"  {key:<11} " + "\n".join(printable(line) for line in str(value).split("\n")))
    if rows:
        print(f"  last {min(len(rows), 10)} of {len(rows)} metrics rows:")
        print(f"    {'step':>6} {'loss':>8} {'val_loss':>8} {'lr':>10} {'tokens/s':>9}")
        for r in rows[-10:]:
            print(
                f"    {r['step']:>6} {num(r.get('loss')):>8} {num(r.get('val_loss')):>8} "
                f"{num(r.get('learning_rate')):>10} {num(r.get('tokens_per_second')):>9}"
            )
    return 0


def run_logs(args: argparse.Namespace) -> int:
    store = JobStore()
    job_id = store.get(args.job_id).id
    text, offset = store.read_log(job_id)
    sys.stdout.write(text)
    while args.follow and store.get(job_id).state in ("queued", "running"):
        time.sleep(0.5)
        text, offset = store.read_log(job_id, offset)
        sys.stdout.write(text)
        sys.stdout.flush()
    if args.follow:  # what was written between the last read and the end
        sys.stdout.write(store.read_log(job_id, offset)[0])
        print(f"--- job {job_id} is {store.get(job_id).state}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    job = JobStore().cancel(args.job_id)
    if job.state == "cancelled":
        print(f"job {job.id} cancelled")
    else:
        print(
            f"job {job.id} will stop at its next step, after saving a checkpoint (`jobs show {job.id}` to watch)"
        )
    return 0


def run_resume(args: argparse.Namespace) -> int:
    store = JobStore()
    job = store.resume(args.job_id, restart=args.restart, trust_remote_code=remote_code_allowed())
    how = (
        "from its last checkpoint"
        if job.resumes_from_checkpoint
        else "from step 0 (no checkpoint to continue from)"
    )
    where = "" if args.no_worker else f"; {cluster.start(store, job.id)}"
    place = f"position {job.queue_position}" if job.queue_position else job.where
    print(f"job {job.id} queued again ({place}), {how}{where}")
    return 0


def run_worker_command(args: argparse.Namespace) -> int:
    from ..worker import run_worker

    return run_worker(
        JobStore(args.store),
        concurrency=args.concurrency,
        poll_seconds=args.poll,
        idle_exit_seconds=args.idle_exit,
        prestart=not args.no_prestart,
    )


# --- formatting ------------------------------------------------------------------------------------
def _progress(job: Job) -> str:
    if job.total_steps:
        return f"{job.step}/{job.total_steps} ({100 * job.progress:.0f}%)"
    return f"step {job.step}" if job.step else "-"
