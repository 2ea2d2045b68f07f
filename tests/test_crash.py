"""Crash safety: atomic files, folder replacement cut short at every step, and training killed
with SIGKILL over and over (inside checkpoint and adapter saves too) that still ends as an
uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from lora_studio import Recipe, files
from lora_studio.adapters import read_metadata
from lora_studio.files import aside_path, atomic_write_text, move_into_place, settle_folder, temp_folder
from lora_studio.jobs import JobStore
from lora_studio.run_folder import checkpoint_folders, is_complete, read_metrics


# --- atomic files ------------------------------------------------------------------------------------
def test_atomic_write_fsyncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "status.json", '{"state": "running"}')
    assert synced == ["file", "folder"]  # the data before the name that points at it
    assert (tmp_path / "status.json").read_text() == '{"state": "running"}'
    assert stat.S_IMODE((tmp_path / "status.json").stat().st_mode) == 0o666 & ~files._UMASK


def test_atomic_writes_to_one_file_do_not_share_a_temp_name(tmp_path, monkeypatch):
    """A second writer of the same file (another thread or process) in the middle of a write."""
    path, real_replace, calls = tmp_path / "config.yaml", os.replace, []

    def replace_after_another_writer(src, dst):
        calls.append(src)
        if len(calls) == 1:
            atomic_write_text(path, "the other writer's\n")  # lands first, then ours replaces it
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_another_writer)
    atomic_write_text(path, "ours\n")
    assert path.read_text() == "ours\n" and len(set(calls)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("fails", ["write", "rename"])
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_debris(tmp_path, monkeypatch, fails):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync" if fails == "write" else "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


# --- replacing a folder, cut short at every step -----------------------------------------------------
# A child process replaces `dest` (which holds "old") with a folder holding "new", and exits
# abruptly (os._exit, as a SIGKILL would leave it) at the chosen moment.
_REPLACE_AND_DIE = textwrap.dedent(
    """
    import os, shutil, sys
    from pathlib import Path
    from lora_studio.files import move_into_place, temp_folder

    dest, crash = Path(sys.argv[1]), sys.argv[2]
    renames, real_rename, real_rmtree = [], os.rename, shutil.rmtree

    def rename(src, dst):
        real_rename(src, dst)
        renames.append(dst)
        if crash == f"after rename {len(renames)}":
            os._exit(9)

    def rmtree(path, ignore_errors=False):
        if crash == "while deleting the old one":  # half of the old one deleted, then death
            os.unlink(sorted(Path(path).iterdir())[0])
            os._exit(9)
        real_rmtree(path, ignore_errors=ignore_errors)

    os.rename, shutil.rmtree = rename, rmtree
    tmp = temp_folder(dest)
    for name in ("a.safetensors", "b.json"):
        (tmp / name).write_text("new")
    if crash == "while writing the new one":
        os._exit(9)
    move_into_place(tmp, dest)
    """
)


@pytest.mark.parametrize(
    "crash, expect",
    [
        ("while writing the new one", "old"),
        ("after rename 1", "old"),  # the old one is aside, the new one not in yet: rolled back
        ("after rename 2", "new"),  # the new one is in, the old one not yet deleted: completed
        ("while deleting the old one", "new"),
        ("never", "new"),
    ],
)
def test_a_folder_replacement_cut_short_is_completed_or_rolled_back(tmp_path, crash, expect):
    dest = tmp_path / "adapter"
    dest.mkdir()
    for name in ("a.safetensors", "b.json"):
        (dest / name).write_text("old")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = subprocess.run([sys.executable, "-c", _REPLACE_AND_DIE, str(dest), crash], env=env).returncode
    assert code == (0 if crash == "never" else 9)

    settle_folder(dest)  # what the next writer or reader of the folder does first
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"a.safetensors": expect, "b.json": expect}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no aside copy, no dead writer's temp folder


def test_a_live_writers_temp_folder_is_left_alone_and_the_next_replacement_keeps_the_aside_copy(tmp_path):
    dest = tmp_path / "merged"
    building = temp_folder(dest)  # this process is alive: its temp folder is not debris
    aside_path(dest).mkdir()  # a replacement cut short: the old version is aside
    (aside_path(dest) / "model.safetensors").write_text("old")
    new = temp_folder(dest)
    (new / "model.safetensors").write_text("new")
    move_into_place(new, dest)  # settles first: the aside copy becomes dest, then is replaced
    assert (dest / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", building.name])


# --- training killed over and over -------------------------------------------------------------------
# Job processes are forked from one "zygote" that loaded the training libraries once (a fresh
# process would spend most of each attempt importing them). Each runs the job service's real
# `run_job`; the test SIGKILLs it at a random moment, or inside a save: a test-only patch in the
# child announces the save (a file named by its pid) and holds it open for WINDOW_SECONDS.
WINDOW_SECONDS = 0.4
SAVE_WINDOWS = {
    "checkpoint": "a checkpoint save (weights and optimizer written, RNG and trainer state not yet)",
    "adapter": "the adapter save (its temporary folder written, not yet renamed into place)",
    "swap": "the adapter replacement (the old adapter renamed aside, the new one not yet in)",
}
OTHER_WINDOWS = {
    "finish": "after the adapter is in place, before the run folder's status says succeeded",
    "recorded": "after the run folder says succeeded, before the job store hears of it",
    "random": "a random moment (at a random step, from start-up to the last step)",
}


def _zygote(store_path: str, signals: str) -> None:
    """Load the training libraries, then fork a job process for each 'JOB_ID ATTEMPT WINDOW' line."""
    import datasets  # noqa: F401  (everything a job imports lazily, so forks start warm)
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import trl  # noqa: F401

    import lora_studio.job_process  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps them: a killed one is gone at once
    print("ready", flush=True)
    for line in sys.stdin:
        job_id, attempt, window = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _job_process(store_path, job_id, int(attempt), window, Path(signals))
            finally:
                os._exit(0)  # never back into the zygote's loop
        print(pid, flush=True)


def _job_process(store_path: str, job_id: str, attempt: int, window: str, signals: Path) -> None:
    import logging

    from transformers import Trainer

    from lora_studio import adapters
    from lora_studio.job_process import run_job
    from lora_studio.jobs import JobStore

    log = os.open(signals.parent / f"attempt-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)

    def hold(wrapped):  # announce the window, hold it open, then do the real work
        def held(*args, **kwargs):
            (signals / str(os.getpid())).write_text(window)
            time.sleep(WINDOW_SECONDS)
            return wrapped(*args, **kwargs)

        return held

    if window == "checkpoint":
        Trainer._save_rng_state = hold(Trainer._save_rng_state)
    elif window == "adapter":
        adapters.move_into_place = hold(adapters.move_into_place)
    elif window == "finish":  # training's own success record, the first write of "succeeded"
        from lora_studio import runs

        real_write = runs.write_status
        runs.write_status = lambda run_dir, state=None, *a, **kw: (
            hold(real_write) if state == "succeeded" else real_write
        )(run_dir, state, *a, **kw)
    elif window == "recorded":
        JobStore.finish = hold(JobStore.finish)
    elif window == "swap":
        real_rename = os.rename

        def rename(src, dst):
            real_rename(src, dst)
            if Path(dst) == aside_path(Path(src)):
                hold(lambda: None)()

        os.rename = rename
    run_job(JobStore(store_path), job_id, attempt)


class Zygote:
    def __init__(self, store_path: Path, signals: Path):
        signals.mkdir()
        self.signals = signals
        # One thread per job process: a tiny model gains nothing from more, and on a busy machine
        # threads waiting for each other made each step 3x slower.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(sys.path),
            "TQDM_DISABLE": "1",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, __file__, "--zygote", str(store_path), str(signals), "lora_studio-crash-test"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid, self.children = self.proc.pid, []

    def start(self, job_id: str, attempt: int, window: str) -> int:
        self.proc.stdin.write(f"{job_id} {attempt} {window}\n")
        self.proc.stdin.flush()
        self.children.append(int(self.proc.stdout.readline()))
        return self.children[-1]

    def close(self) -> None:
        for pid in self.children:  # a failed test leaves none training on (forks keep the zygote's argv)
            try:
                if b"lora_studio-crash-test" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.01)


def _check_adapter(folder: Path, base: Any) -> None:
    """Absent, or complete and loadable: PEFT loads it onto the base and it runs."""
    import torch
    from peft import PeftModel

    if not folder.exists():
        return
    meta = read_metadata(folder)
    model = PeftModel.from_pretrained(base, str(folder))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    model.unload()  # take the LoRA layers off the shared base again
    assert meta["metrics"]["global_step"] > 0


def _check_after_kill(run: Path, base: Any) -> None:
    _check_adapter(run / "adapter", base)
    for name in ("status.json", "data_report.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())  # atomic: never half-written
    if (run / "config.yaml").exists():
        Recipe.from_yaml(run / "config.yaml")


@pytest.mark.slow
def test_training_killed_at_random_moments_and_inside_saves_resumes_to_the_same_end(
    tiny_model_dir, chat_file, tmp_path
):
    from transformers import AutoModelForCausalLM

    rng = random.Random(20240607)
    store = JobStore(tmp_path / "jobs.sqlite")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    recipe = {
        "model": {"base_model": str(tiny_model_dir)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"train_file": str(chat_file), "max_length": 64},
        "train": {
            "max_steps": -1,
            "num_train_epochs": 2,  # 36 training rows in batches of 4: 18 steps
            "per_device_train_batch_size": 4,
            "eval_every_steps": 3,
            "logging_steps": 1,
            "learning_rate": 5e-3,
            "early_stopping_patience": None,
        },
    }
    zygote = Zygote(store.path, tmp_path / "signals")
    counts = {window: 0 for window in [*SAVE_WINDOWS, *OTHER_WINDOWS, "none"]}
    resumes, final_steps = 0, []
    try:
        straight = store.submit({**recipe, "name": "uninterrupted"})
        _run_attempt(store, zygote, straight, "none", rng)
        expected = _check_finished(store, straight, 18, base)

        for i in range(3):
            job_id = store.submit({**recipe, "name": f"killed-{i}"})
            # Random kills and checkpoint-save kills in a random order, then the three adapter windows:
            # "finish" leaves a complete adapter, so the next attempt's save replaces it ("swap").
            # The last attempt of the first job is killed after its run folder said succeeded: it
            # stays succeeded (the run folder owns the state), and is checked like the others.
            plan = ["random", "random", "checkpoint", "checkpoint"]
            rng.shuffle(plan)
            for window in [*plan, "adapter", "finish", "swap"]:
                killed = _run_attempt(store, zygote, job_id, window, rng)
                ended = store.get(job_id)
                assert killed, f"job {job_id} ended ({ended.state}: {ended.error}) before its {window} kill"
                counts[window] += 1
                _check_after_kill(store.get(job_id).run_dir, base)
                assert store.resume(job_id).state == "queued"
                resumes += 1
            last = "recorded" if i == 0 else "none"
            counts[last] = counts.get(last, 0) + _run_attempt(store, zygote, job_id, last, rng)
            final_steps.append(_check_finished(store, job_id, expected, base))
    finally:
        zygote.close()

    kills = sum(counts.values())
    in_saves = sum(counts[w] for w in SAVE_WINDOWS)
    print(
        f"\ncrash test: {kills} SIGKILLs ({in_saves} inside saves: {counts['checkpoint']} checkpoint, "
        f"{counts['adapter'] + counts['swap']} adapter; {counts['finish']} before the run folder said "
        f"succeeded, {counts['recorded']} after; {counts['random']} at random moments), {resumes} resumes; "
        "final step counts "
        f"{final_steps}, uninterrupted run {expected}"
    )
    assert kills >= 21 and in_saves >= 12 and counts["recorded"] == 1 and final_steps == [expected] * 3


def _run_attempt(store: JobStore, zygote: Zygote, job_id: str, window: str, rng: random.Random) -> bool:
    """Start the job's next attempt and SIGKILL it in `window` ("none": let it finish).

    Returns whether it was killed (False: it ended first).
    """
    job = store.claim_next(zygote.pid)
    assert job is not None and job.id == job_id
    pid = zygote.start(job.id, job.attempts, window)
    if window == "none":
        _wait(lambda: store.get(job_id).finished, 300, f"job {job_id} to finish")
        return False
    if window == "random":  # a random step of 0..14 (0: while starting up), then a part of a step
        # Steps of the tiny model take milliseconds and progress in status.json is written at most
        # twice a second, so watch the metrics lines (one per step) and stop before the last
        # checkpoint (step 15): a kill past it would leave the later save windows nothing to do.
        at_step = rng.randint(0, 14)
        _wait(lambda: _logged_step(store, job_id) >= at_step or not _alive(pid), 300, f"step {at_step}")
        time.sleep(rng.uniform(0, 0.01))
    else:
        announced = zygote.signals / str(pid)
        _wait(lambda: announced.exists() or not _alive(pid), 300, f"the {window} window")
        time.sleep(rng.uniform(0, WINDOW_SECONDS))
        announced.unlink(missing_ok=True)
    if not _alive(pid):
        return False
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not _alive(pid), 30, f"process {pid} to die")
    store.process_exited(job_id, job.attempts, -signal.SIGKILL)  # as the worker does when it reaps one
    assert store.get(job_id).state == ("succeeded" if window == "recorded" else "interrupted")
    return True


def _logged_step(store: JobStore, job_id: str) -> int:
    """The last step in the run's metrics.jsonl (0 before the first)."""
    run_dir = store.get(job_id).run_dir
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] if run_dir else []
    return max(steps, default=0)


def _check_finished(store: JobStore, job_id: str, expected: int, base: Any) -> int:
    """Succeeded at the expected step, each step logged once, a loadable adapter, no debris."""
    job = store.get(job_id)
    assert job.state == "succeeded", job.error
    assert job.step == job.metrics["global_step"] == expected
    in_store = [r["step"] for r in store.metrics(job_id) if "loss" in r]
    in_file = [r["step"] for r in read_metrics(job.run_dir / "metrics.jsonl") if "loss" in r]
    assert in_store == in_file == list(range(1, expected + 1))
    _check_adapter(job.adapter_dir, base)
    assert read_metadata(job.adapter_dir)["metrics"]["global_step"] == expected
    assert [p.name for p in job.run_dir.iterdir() if p.name.startswith(".adapter")] == []
    assert all(is_complete(p) for p in checkpoint_folders(job.run_dir))
    return job.step


if __name__ == "__main__" and sys.argv[1] == "--zygote":
    _zygote(sys.argv[2], sys.argv[3])
