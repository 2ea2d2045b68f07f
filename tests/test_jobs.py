"""The job service: the SQLite store, real worker and job processes, cancel, crash recovery, the CLI.

Tests that train share one worker (the `service` fixture), whose spare process keeps the training
libraries loaded, so each job starts in about a second instead of paying the imports again.
Every wait polls with a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_studio import runs
from lora_studio.cli import main
from lora_studio.errors import ConfigError, DataError, JobError
from lora_studio.jobs import JobStore
from lora_studio.run_folder import checkpoint_step, last_complete_checkpoint

pytestmark = pytest.mark.subprocess  # real worker and job processes


def make_recipe(model_dir: Path, data_file: Path, name: str = "tiny-job", **train: object) -> dict:
    return {
        "name": name,
        "model": {"base_model": str(model_dir)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"train_file": str(data_file), "max_length": 64},
        "train": {
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "eval_every_steps": 3,
            "logging_steps": 1,
            "learning_rate": 5e-3,
            "early_stopping_patience": None,
            **train,
        },
    }


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def loss_rows(store: JobStore, job_id: str) -> dict[int, dict]:
    rows = [r for r in store.metrics(job_id) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in rows}


@dataclass
class Service:
    store: JobStore
    worker: subprocess.Popen  # the first worker; a test may kill it and start another with ensure_worker()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    """A running `lora-studio worker` on its own store, stopped (and checked to stop cleanly) at the end."""
    home = tmp_path_factory.mktemp("jobs-service")
    store = JobStore(home / "jobs.sqlite")
    env = {**os.environ, "LORA_STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    with open(home / "worker.log", "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "lora_studio.cli", "worker", "--store", str(store.path), "--poll", "0.1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_for(lambda: store.worker_pid() == worker.pid, 30, "the worker to take the store's lock")
    yield Service(store, worker)
    pid = store.worker_pid()
    if pid:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: store.worker_pid() is None, 90, "the worker to stop")
    if pid == worker.pid:
        assert worker.wait(timeout=30) == 0
    assert store.list(states=["running"]) == []


# --- the store alone (no training) -------------------------------------------------------------------
def test_bad_recipes_are_rejected_at_submit_and_never_queued(tiny_model_dir, chat_file, tmp_path, capsys):
    store = JobStore()
    good = make_recipe(tiny_model_dir, chat_file)
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        store.submit({**good, "train": {"max_stepz": 3}})
    with pytest.raises(ConfigError, match="max_steps: expected an integer, got 'ten'"):
        store.submit(good, ["max_steps=ten"])
    with pytest.raises(DataError, match="data file not found: .*missing.jsonl"):
        store.submit({**good, "data": {"train_file": str(tmp_path / "missing.jsonl")}})
    broken = tmp_path / "broken.jsonl"
    broken.write_text(chat_file.read_text() + "{not json\n")
    with pytest.raises(DataError, match="broken.jsonl, line 41: not valid JSON"):
        store.submit({**good, "data": {"train_file": str(broken)}})

    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text("name: bad\ndata: {train_file: nowhere.jsonl}\nlora: {rank: 8}\n")
    assert main(["jobs", "submit", str(recipe_file), "--no-worker"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown setting 'lora.rank'" in err
    assert store.list() == []


def test_submit_pins_paths_and_gives_each_job_its_own_run_folder(
    tiny_model_dir, chat_file, tmp_path, monkeypatch, studio_home
):
    import yaml

    assert JobStore().home == studio_home
    recipe = make_recipe(tiny_model_dir, chat_file)
    recipe["data"]["train_file"] = chat_file.name  # relative to the recipe file
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path.parent)  # the worker runs elsewhere: nothing may stay relative
    store = JobStore()
    first, second = store.submit(tmp_path / "r.yaml"), store.submit(tmp_path / "r.yaml", ["max_steps=3"])
    a, b = store.get(first), store.get(second)
    assert a.recipe["data"]["train_file"] == str(chat_file.resolve())
    assert (a.run_dir, b.run_dir) == (
        studio_home / "runs" / f"tiny-job-{first}",
        studio_home / "runs" / f"tiny-job-{second}",
    )
    assert (a.recipe["train"]["max_steps"], b.recipe["train"]["max_steps"]) == (6, 3)
    assert [j.id for j in store.list()] == [second, first]  # newest first
    assert (a.queue_position, b.queue_position) == (1, 2) and a.state == "queued"
    with pytest.raises(ConfigError, match=f"job {first} already uses the run folder"):
        store.submit(a.recipe)


def test_concurrent_submissions_from_several_processes_lose_no_job(tiny_model_dir, chat_file, tmp_path):
    import yaml

    store = JobStore()
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(make_recipe(tiny_model_dir, chat_file)))
    script = (
        "import sys; from lora_studio.jobs import JobStore; s = JobStore(sys.argv[1]); "
        "print(*[s.submit(sys.argv[2]) for _ in range(10)])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(store.path), str(recipe_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    ids = [job_id for p in procs for job_id in p.communicate(timeout=120)[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert len(ids) == len(set(ids)) == 40
    jobs = store.list()
    assert sorted(j.id for j in jobs) == sorted(ids)
    assert sorted(j.queue_position for j in jobs) == list(range(1, 41))


def test_a_dead_job_process_is_marked_interrupted_and_a_live_silent_one_is_not(tiny_model_dir, chat_file):
    store = JobStore(heartbeat_timeout=30)
    gone = subprocess.Popen(["true"])
    gone.wait()
    lost, silent, reused, cancelled = (
        store.submit(make_recipe(tiny_model_dir, chat_file, name=n))
        for n in ("lost", "silent", "reused", "cancelled")
    )
    assert store.claim_next(gone.pid).id == lost
    job = store.get(lost)  # every read settles jobs whose process is gone
    assert job.state == "interrupted" and "process is gone" in job.error and job.attempts == 1

    # A live process that stopped beating (stopped, suspended, starved); its command line names
    # lora_studio, like a job process. On this host the OS says it is alive: it stays running.
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "lora_studio"])
    try:
        assert store.claim_next(hung.pid).id == silent and store.get(silent).state == "running"
        time.sleep(2)
        impatient = JobStore(store.path, heartbeat_timeout=0.5)
        assert impatient.get(silent).state == "running"  # silent for 2 s, alive
        # On another host the store cannot ask the OS: there a silent job counts as lost.
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE jobs SET host = 'gpu-box-2' WHERE id = ?", (silent,))
        job = impatient.get(silent)
        assert job.state == "interrupted" and "no heartbeat from host gpu-box-2 for 2 s" in job.error

        # A pid the job wrote before this process started (its last heartbeat is older): reused, not its.
        assert store.claim_next(hung.pid).id == reused
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (time.time() - 3600, reused))
        assert store.get(reused).state == "interrupted"

        assert store.claim_next(hung.pid).id == cancelled
        assert store.cancel(cancelled).state == "running"  # asked to stop at its next step...
    finally:
        hung.kill()
        hung.wait()
    assert store.get(cancelled).state == "cancelled"  # ...and it died first: the cancel still counts

    # Resuming without a checkpoint starts over, unless checkpoints were written and are gone.
    assert store.resume(lost).state == "queued" and not store.get(lost).resumes_from_checkpoint
    run_dir = store.get(lost).run_dir  # made at submit, with its status
    runs.write_progress(run_dir, 5, 18, None)  # its run folder says it got to step 5
    interrupt(store, lost)
    with pytest.raises(JobError, match=f"job {lost} reached step 5 but its checkpoints are missing"):
        store.resume(lost)
    assert not store.resume(lost, restart=True).resumes_from_checkpoint

    # Killed while saving its first checkpoint (step 3): a half-written one is none; it starts over.
    half = run_dir / "checkpoints" / "checkpoint-3"
    half.mkdir(parents=True)
    (half / "adapter_model.safetensors").write_bytes(b"")
    runs.write_progress(run_dir, 3, 18, None)
    interrupt(store, lost)
    assert not store.resume(lost).resumes_from_checkpoint
    (half / "trainer_state.json").write_text('{"global_step": 3}')  # the Trainer writes it last
    interrupt(store, lost)
    assert store.resume(lost).resumes_from_checkpoint


def test_the_run_folder_owns_the_state_and_the_store_only_queue_facts(tiny_model_dir, chat_file):
    store = JobStore()
    job_id = store.submit(make_recipe(tiny_model_dir, chat_file, name="owned"))
    folder = store.get(job_id).run_dir
    assert runs.read_run(folder).state == "queued"  # written at submit, before any training
    with sqlite3.connect(store.path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    assert "queue" in columns and not {"state", "error", "adapter_dir"} & columns

    # Whatever the run folder says is what the job says: one record, read by jobs and runs alike.
    runs.write_status(folder, "failed", error="out of disk at step 3")
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET queue = 'done' WHERE id = ?", (job_id,))
    job = store.get(job_id)
    assert (job.state, job.error) == ("failed", "out of disk at step 3") and job.finished_at
    assert job.adapter_dir is None and store.list(states=["failed"]) == [job]

    # The store writes the folder when it changes the state: resume, claim, a dead process.
    assert store.resume(job_id).state == "queued" == runs.read_run(folder).state
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "lora_studio"])
    try:
        attempt = store.claim_next(worker.pid).attempts
        status = runs.read_status(folder)
        assert status["state"] == "running" and status["pid"] == worker.pid and status["error"] is None
    finally:
        worker.kill()
        worker.wait()
    store.process_exited(job_id, attempt, -9)  # its process died: the store says so in the folder
    job = store.get(job_id)
    assert job.state == "interrupted" == runs.read_status(folder)["state"] and "signal 9" in job.error

    # A folder deleted under a finished job: the job says so instead of guessing.
    shutil.rmtree(folder)
    job = store.get(job_id)
    assert job.state == "failed" and "is gone" in job.error


def test_a_store_from_before_moves_each_state_into_its_run_folder(tmp_path):
    """A jobs.sqlite whose rows held the state (every earlier version) opens, and nothing is lost."""
    path, runs_dir = tmp_path / "jobs.sqlite", tmp_path / "runs"
    old_schema = (
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, name TEXT NOT "
        "NULL, state TEXT NOT NULL, recipe TEXT NOT NULL, run_dir TEXT NOT NULL, created_at REAL NOT NULL, "
        "queued_at REAL NOT NULL, started_at REAL, finished_at REAL, adapter_dir TEXT, error TEXT, resume "
        "INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, attempt INTEGER NOT "
        "NULL DEFAULT 0, pid INTEGER, host TEXT, heartbeat_at REAL)"
    )
    rows = {  # id: (state, error, what its run folder said)
        "aaaaaa0001": ("cancelled", "cancelled while queued", None),  # never started: no folder
        "aaaaaa0002": ("interrupted", "interrupted: its process is gone", "running"),
        "aaaaaa0003": ("succeeded", None, "succeeded"),
        "aaaaaa0004": ("queued", None, None),
    }
    with sqlite3.connect(path) as db:
        db.execute(old_schema)
        for job_id, (state, error, said) in rows.items():
            folder = runs_dir / f"old-{job_id}"
            if said:
                runs.write_status(folder, said)
            db.execute(
                "INSERT INTO jobs (id, name, state, recipe, run_dir, created_at, queued_at, error) "
                "VALUES (?, 'old', ?, '{}', ?, 0, 0, ?)",
                (job_id, state, str(folder), error),
            )
    store = JobStore(path)
    jobs = {job.id: job for job in store.list()}
    assert {i: (j.state, j.error) for i, j in jobs.items()} == {i: r[:2] for i, r in rows.items()}
    assert runs.read_run(runs_dir / "old-aaaaaa0001").state == "cancelled"
    assert store.has_queued() and store.claim_next(os.getpid()).id == "aaaaaa0004"
    JobStore(path)  # opening it again changes nothing


def interrupt(store: JobStore, job_id: str) -> None:
    """As if its process had died: the queue is done with it and its run folder says interrupted."""
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET queue = 'done' WHERE id = ?", (job_id,))
    runs.write_status(store.get(job_id).run_dir, "interrupted")


def test_a_damaged_job_store_is_one_clear_line_in_the_cli_and_the_ui(studio_home, capsys):
    import gradio as gr

    from ui.common import shows_errors
    from ui.train_tab import on_page_load

    path = studio_home / "jobs.sqlite"
    path.write_bytes(b"not an SQLite database\n" * 100)
    for command in (["jobs", "list"], ["jobs", "show", "abc"], ["worker", "--store", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: the job store {path} is damaged (file is not a database); move it")
        assert err.count("\n") == 1 and f"mv {path}* " in err and "run folders under" in err
    with pytest.raises(gr.Error, match="is damaged .*move it aside"):
        shows_errors(on_page_load)()

    # Damaged inside (a valid header, garbage pages): the same, found by the first query.
    (studio_home / "damaged").mkdir()
    path.rename(studio_home / "damaged" / path.name)  # what the message says to do
    store = JobStore()
    assert store.list() == []  # a fresh store
    with sqlite3.connect(store.path) as db:
        for i in range(100):
            db.execute(
                "INSERT INTO jobs (id, name, queue, recipe, run_dir, created_at, queued_at) "
                "VALUES (?, 'x', 'queued', ?, 'runs/x', 0, 0)",
                (f"job{i}", "{}" + " " * 2000),
            )
    with sqlite3.connect(store.path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # into the main file, which is then damaged
    with open(path, "r+b") as f:
        f.seek(3 * 4096)
        f.write(b"\xff" * 5 * 4096)
    assert main(["jobs", "list"]) == 2
    assert "is damaged (database disk image is malformed)" in capsys.readouterr().err


def test_cli_submit_prints_the_id_last_and_manages_the_job(tiny_model_dir, chat_file, tmp_path, capsys):
    import yaml

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(make_recipe(tiny_model_dir, chat_file)))
    assert main(["jobs", "submit", str(recipe_file), "--set", "max_steps=3", "--no-worker"]) == 0
    job_id = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{10}", job_id)
    assert main(["jobs", "list"]) == 0
    assert re.search(rf"^{job_id} +tiny-job +queued ", capsys.readouterr().out, re.M)
    assert main(["jobs", "show", job_id[:5], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["state"], shown["recipe"]["train"]["max_steps"], shown["metrics_rows"]) == ("queued", 3, [])
    assert main(["jobs", "resume", job_id]) == 2
    assert "is queued; only interrupted, cancelled, failed jobs can be resumed" in capsys.readouterr().err
    assert main(["jobs", "cancel", job_id]) == 0
    assert f"job {job_id} cancelled" in capsys.readouterr().out
    assert main(["jobs", "cancel", job_id]) == 2
    assert "already ended as cancelled" in capsys.readouterr().err
    assert main(["jobs", "show", "0000"]) == 2
    assert "'0000' is not a job" in capsys.readouterr().err


# --- real workers and training -----------------------------------------------------------------------
def test_two_jobs_run_one_at_a_time_in_order_and_succeed(
    service, tiny_model_dir, chat_file, monkeypatch, capsys
):
    store = service.store
    first = store.submit(make_recipe(tiny_model_dir, chat_file, name="first"))
    second = store.submit(make_recipe(tiny_model_dir, chat_file, name="second", max_steps=3))
    steps: dict[str, list[int]] = {first: [], second: []}

    def both_finished() -> bool:
        jobs = [store.get(first), store.get(second)]
        assert sum(j.state == "running" for j in jobs) <= 1
        for j in jobs:
            steps[j.id].append(j.step)
        return all(j.finished for j in jobs)

    wait_for(both_finished, 240, "both jobs to finish")
    a, b = store.get(first), store.get(second)
    assert (a.state, b.state) == ("succeeded", "succeeded"), (a.error, b.error)
    assert a.started_at < a.finished_at <= b.started_at < b.finished_at  # first in, first out, one at a time
    for job_id, seen in steps.items():
        assert seen == sorted(seen), f"progress of {job_id} went backwards: {seen}"
    assert (a.step, a.total_steps, b.step, b.total_steps) == (6, 6, 3, 3)
    assert sorted(loss_rows(store, first)) == [1, 2, 3, 4, 5, 6]
    assert {r["step"] for r in store.metrics(first) if "val_loss" in r} >= {3, 6}  # (and 0: the base's)
    assert a.metrics["global_step"] == 6 and a.metrics["train_loss"] > 0 and a.metrics["val_loss"] > 0
    assert a.metrics["tokens_per_second"] > 0 and a.eta_seconds is None
    assert a.adapter_dir == a.run_dir / "adapter" and (a.adapter_dir / "lora_studio.json").is_file()
    assert "adapter saved to" in store.read_log(first)[0]
    # The run index in the worker's studio home lists both jobs' runs, under their job ids.
    monkeypatch.setenv("LORA_STUDIO_HOME", str(store.home))
    assert main(["runs", "list", "--json"]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert {first, second} <= set(listed)
    assert (listed[first]["name"], listed[first]["state"], listed[first]["step"]) == ("first", "succeeded", 6)
    assert (
        listed[first]["folder"] == str(a.run_dir)
        and listed[first]["best_val_loss"] == a.metrics["best_val_loss"]
    )
    assert main(["adapters", "list", "--json"]) == 0
    assert {first, second} <= {r["id"] for r in json.loads(capsys.readouterr().out)}


def test_cancel_stops_a_running_job_at_a_checkpoint_and_a_queued_one_never_starts(
    service, tiny_model_dir, chat_file
):
    store = service.store
    running = store.submit(
        make_recipe(tiny_model_dir, chat_file, name="long", max_steps=40, eval_every_steps=4)
    )
    queued = store.submit(make_recipe(tiny_model_dir, chat_file, name="waiting"))
    wait_for(lambda: store.get(running).step >= 5, 120, "the long job to pass its first checkpoint")
    assert store.cancel(queued).state == "cancelled"
    asked = store.cancel(running)
    assert asked.state == "running" and asked.cancel_requested
    wait_for(lambda: store.get(running).finished, 60, "the running job to stop")

    job = store.get(running)
    assert job.state == "cancelled" and 5 <= job.step < 40
    assert f"checkpoint-{job.step} saved" in job.error
    assert (job.run_dir / "checkpoints" / f"checkpoint-{job.step}" / "trainer_state.json").is_file()
    assert not (job.run_dir / "adapter").exists()
    assert json.loads((job.run_dir / "status.json").read_text())["state"] == "cancelled"
    never = store.get(queued)
    assert never.attempts == 0 and never.started_at is None
    assert [p.name for p in never.run_dir.iterdir()] == ["status.json"]  # its state, nothing trained
    assert runs.read_run(never.run_dir).state == "cancelled"

    # A damaged checkpoint: the resumed attempt fails with a clear message, once, and the worker goes on.
    checkpoint = job.run_dir / "checkpoints" / f"checkpoint-{job.step}"
    (checkpoint / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert store.resume(running).resumes_from_checkpoint
    wait_for(
        lambda: store.get(running).state == "failed", 120, "the resume from a damaged checkpoint to fail"
    )
    time.sleep(1)  # ten worker polls: long enough to see a retry if there were one
    failed = store.get(running)
    assert failed.state == "failed" and failed.attempts == 2 and store.worker_pid() is not None
    assert f"cannot resume from {checkpoint}: it is damaged" in failed.error

    shutil.rmtree(job.run_dir / "checkpoints")  # and a missing one: refused before it is queued
    with pytest.raises(JobError, match="checkpoints are missing .* --restart"):
        store.resume(running)
    assert store.get(running).state == "failed"


def test_a_killed_job_is_seen_at_once_and_resume_continues_its_run(service, tiny_model_dir, chat_file):
    """SIGKILL of the training process (as the out-of-memory killer does): the work since the last
    checkpoint is lost and redone; the run ends at the same step as an uninterrupted one."""
    store = service.store
    # Two epochs of 36 training rows in batches of 4: an uninterrupted run takes 18 steps.
    job_id = store.submit(
        make_recipe(tiny_model_dir, chat_file, max_steps=-1, num_train_epochs=2, eval_every_steps=4)
    )
    wait_for(lambda: store.get(job_id).step >= 6, 180, "the job to pass its first checkpoint")
    job = store.get(job_id)
    assert job.pid != store.worker_pid()
    os.kill(job.pid, signal.SIGKILL)
    wait_for(lambda: store.get(job_id).state == "interrupted", 10, "the killed job to be seen as interrupted")
    assert job.total_steps == 18 and "killed" in store.get(job_id).error

    before = loss_rows(store, job_id)
    # the checkpoint resume takes: the last whole one (a kill during a save leaves a broken one after it)
    checkpoint = checkpoint_step(last_complete_checkpoint(job.run_dir))
    # the steps after the last checkpoint (if the kill came after one) are lost and will be redone;
    # a kill that lands right at a checkpoint's step loses none
    assert checkpoint <= max(before)
    assert store.resume(job_id).resumes_from_checkpoint
    wait_for(lambda: store.get(job_id).finished, 240, "the resumed job to finish")

    done = store.get(job_id)
    assert done.state == "succeeded", done.error
    assert done.step == done.total_steps == done.metrics["global_step"] == 18
    after = loss_rows(store, job_id)
    assert sorted(after) == list(range(1, 19))
    assert all(after[s] == before[s] for s in range(1, checkpoint + 1))  # kept, not rerun
    for s in range(checkpoint + 1, max(before) + 1):  # redone from the checkpoint, not from the start
        assert after[s]["learning_rate"] == pytest.approx(before[s]["learning_rate"])
        assert abs(after[s]["loss"] - before[s]["loss"]) < abs(
            after[s]["loss"] - before[s - checkpoint]["loss"]
        )


def test_a_stopped_job_process_is_never_taken_for_dead_and_finishes_when_continued(
    service, tiny_model_dir, chat_file
):
    """SIGSTOP (as a debugger, a suspended laptop or a starved machine does): heartbeats stop, the
    process lives. The store asks the OS, not the clock, and the job goes on when continued."""
    store = service.store
    job_id = store.submit(make_recipe(tiny_model_dir, chat_file, max_steps=12, eval_every_steps=4))
    wait_for(lambda: store.get(job_id).step >= 2, 180, "the job to start training")
    pid = store.get(job_id).pid
    os.kill(pid, signal.SIGSTOP)
    try:
        impatient = JobStore(store.path, heartbeat_timeout=1)
        time.sleep(3 * 2.0)  # three heartbeats missed
        job = impatient.get(job_id)
        assert time.time() - job.heartbeat_at > 3
        assert job.state == "running" and job.attempts == 1, job.error
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: store.get(job_id).finished, 240, "the continued job to finish")
    done = store.get(job_id)
    assert done.state == "succeeded" and done.attempts == 1 and done.metrics["global_step"] == 12
    assert sorted(loss_rows(store, job_id)) == list(range(1, 13))


def test_sigkill_of_the_worker_interrupts_its_job_at_a_checkpoint_and_resume_finishes_it(
    service, tiny_model_dir, chat_file
):
    store = service.store
    job_id = store.submit(make_recipe(tiny_model_dir, chat_file, max_steps=12, eval_every_steps=4))
    wait_for(lambda: store.get(job_id).step >= 2, 180, "the job to start training")
    os.kill(store.worker_pid(), signal.SIGKILL)
    # The kernel sends the orphaned job SIGTERM: it saves a checkpoint at its next step and stops.
    wait_for(lambda: store.get(job_id).state != "running", 60, "the job to stop")
    stopped = store.get(job_id)
    assert stopped.state == "interrupted" and f"checkpoint-{stopped.step} saved" in stopped.error
    assert (stopped.run_dir / "checkpoints" / f"checkpoint-{stopped.step}").is_dir()
    assert store.worker_pid() is None

    assert store.resume(job_id).resumes_from_checkpoint
    assert store.ensure_worker() is not None and store.ensure_worker() is None  # one worker per store
    wait_for(lambda: store.get(job_id).finished, 240, "the resumed job to finish")
    done = store.get(job_id)
    assert done.state == "succeeded" and done.attempts == 2 and done.metrics["global_step"] == 12
    assert sorted(loss_rows(store, job_id)) == list(range(1, 13))  # nothing lost, nothing logged twice
