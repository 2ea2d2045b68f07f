"""Compute threads: the cores a process may use, the studio's split, explicit counts, backing off."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_studio import thread_tuning, threads
from lora_studio.cli import main
from lora_studio.errors import ConfigError
from lora_studio.thread_tuning import TRIAL_STEPS, WINDOW_STEPS, TrainingThreads

CORES = threads.available_cores()
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="the split needs at least 2 usable cores")


@pytest.fixture(autouse=True)
def fresh_threads(monkeypatch):
    """No explicit count from the environment or an earlier test; torch's threads restored after."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.ENV, raising=False)
    before = torch.get_num_threads()
    yield
    threads.set_explicit(None)
    threads.set_label(None)
    threads.release()
    torch.set_num_threads(before)


@pytest.fixture
def other_process():
    """A live process of this studio that is not us: claims written under its pid count as another's."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def claim(pid: int, label: str, explicit: int | None = None, touched: float | None = None) -> None:
    folder = threads.claims().folder
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time() if touched is None else touched
    body = {"pid": pid, "label": label, "threads": explicit, "started": now - 100, "touched": now}
    (folder / f"{pid}.json").write_text(json.dumps(body))


# --- the cores this process may use -----------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or CORES < 2, reason="needs Linux and 2 cores")
def test_available_cores_honour_the_affinity_of_a_child_process(tmp_path):
    one_cpu = min(os.sched_getaffinity(0))
    code = (
        "import os, torch; from lora_studio import threads\n"
        f"os.sched_setaffinity(0, {{{one_cpu}}})\n"
        "share = threads.use('training')\n"
        "print(threads.available_cores(), torch.get_num_threads(), share.line('training'))\n"
    )
    env = {**os.environ, "LORA_STUDIO_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=2) == ["1", "1", "training on 1 of 1 cores\n"]
    assert os.cpu_count() >= 2  # while torch's own default there would have been every core


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "_own_cgroups", lambda: ["app/job", "app", ""])
    assert threads.cgroup_cpu_limit(tmp_path) is None  # no files: no limit
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None  # "max": unlimited
    (tmp_path / "app" / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 2  # 1.5 cores of quota: 2 threads, rounded up
    (tmp_path / "cpu").mkdir()  # cgroup v1 beside it: the tightest limit wins
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 2


# --- the studio's split ----------------------------------------------------------------------------
def test_the_split_gives_explicit_claims_their_count_and_the_rest_evenly():
    me = {"pid": 1, "label": "training run a", "threads": None, "started": 5}
    ui = {"pid": 2, "label": "the UI's chat", "threads": None, "started": 1}
    serve = {"pid": 3, "label": "the server", "threads": 1, "started": 9}
    assert threads.split(2, me, []).threads == 2
    two = threads.split(2, me, [ui])
    assert (two.threads, two.held) == (1, (("the UI's chat", 1),))
    assert two.line("training") == "training on 1 of 2 cores: the UI's chat holds 1"
    assert threads.split(4, me, [serve]).threads == 3  # the server's 1, then the 3 left
    odd = threads.split(3, me, [ui])  # the odd core goes to the older claim
    assert (odd.threads, odd.held) == (1, (("the UI's chat", 2),))
    assert threads.split(1, me, [ui, serve]).threads == 1  # never fewer than one


def test_other_processes_claims_count_while_fresh_and_alive(other_process):
    claim(other_process, "the UI's chat")
    assert threads.share_for("training").threads == max(1, CORES // 2)
    claim(other_process, "the UI's chat", touched=time.time() - threads.HOLD_SECONDS - 1)
    assert threads.share_for("training").threads == CORES  # a chat idle this long holds nothing
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim(dead.pid, "gone")
    claim(other_process, "the UI's chat")
    assert threads.share_for("training").held == (("the UI's chat", max(1, CORES // 2)),)
    assert not (threads.claims().folder / f"{dead.pid}.json").exists()  # a dead process's file is removed
    threads.release()
    assert not (threads.claims().folder / f"{os.getpid()}.json").exists()


# --- explicit counts win ---------------------------------------------------------------------------
@needs_two_cores
def test_explicit_threads_beat_the_environment_and_the_share(other_process, monkeypatch):
    claim(other_process, "the UI's chat")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    share = threads.use("training")
    assert (share.threads, share.explicit, torch.get_num_threads()) == (2, "$OMP_NUM_THREADS", 2)
    threads.set_explicit(1)
    share = threads.use("training")
    assert (share.threads, share.explicit, torch.get_num_threads()) == (1, "--threads", 1)
    assert share.line("training") == "training on 1 of 2 cores (set by --threads)"
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    threads.set_explicit(None)
    with pytest.raises(ConfigError, match=r"\$OMP_NUM_THREADS: expected a whole number .* got 'two'"):
        threads.use("training")


@needs_two_cores
def test_cli_train_threads_flag_wins_over_omp_num_threads_and_the_share(
    tiny_recipe, other_process, monkeypatch, tmp_path
):
    claim(other_process, "the UI's chat")  # the share alone would give 1 of 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tiny_recipe.to_dict()))
    assert main(["train", str(recipe), "--threads", "2", "--set", "max_steps=2"]) == 0
    status = json.loads((tiny_recipe.output_dir / "status.json").read_text())
    assert status["threads"]["threads"] == 2 and status["threads"]["explicit"] == "--threads"
    assert status["threads"]["why"] == "training on 2 of 2 cores (set by --threads)"
    assert status["state"] == "succeeded"


# --- training --------------------------------------------------------------------------------------
@needs_two_cores
def test_training_takes_its_share_and_says_so_in_the_log_and_status(tiny_recipe, other_process, caplog):
    from lora_studio.training import train

    claim(other_process, "the UI's chat")
    with caplog.at_level(logging.INFO, logger="lora_studio.threads"):
        result = train(tiny_recipe)
    line = f"training on 1 of {CORES} cores: the UI's chat holds {CORES - 1}"
    assert line in caplog.text
    status = json.loads((result.run_dir / "status.json").read_text())
    assert status["threads"]["threads"] == 1 and status["threads"]["why"] == line
    assert line in (result.run_dir / "train.log").read_text()
    assert not (threads.claims().folder / f"{os.getpid()}.json").exists()  # released at the end


@needs_two_cores
def test_the_chat_engine_takes_its_share_beside_a_training_run(tiny_model_dir, other_process, caplog):
    from lora_studio.inference import InferenceEngine

    engine = InferenceEngine(str(tiny_model_dir))
    threads.set_label("the UI's chat")
    claim(other_process, "training run demo-ab12")
    used = []
    engine._base.register_forward_pre_hook(lambda *_: used.append(torch.get_num_threads()))
    with caplog.at_level(logging.INFO, logger="lora_studio.threads"):
        engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert used and set(used) == {CORES // 2}  # in the generating thread, every forward pass
    assert f"chat on {CORES // 2} of {CORES} cores: training run demo-ab12 holds" in caplog.text
    mine = json.loads((threads.claims().folder / f"{os.getpid()}.json").read_text())
    assert mine["label"] == "the UI's chat"  # how the training run names it in its own line


def feed(callback: TrainingThreads, state: SimpleNamespace, steps: int, speed: float, wait: float) -> None:
    """`steps` measured steps of one second each at `speed` tokens/s, waiting `wait` of each for a CPU."""
    for _ in range(steps):
        state.global_step += 1
        state.num_input_tokens_seen += int(speed)
        callback._measured(state, 1.0, int(speed), wait * torch.get_num_threads())


@needs_two_cores
def test_training_starts_below_its_share_when_other_tasks_already_fill_the_cores(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(thread_tuning, "others_running", lambda: float(CORES - 1))
    with caplog.at_level(logging.INFO, logger="lora_studio.thread_tuning"):
        callback = TrainingThreads(tmp_path / "run")
    assert callback.threads == 1 == torch.get_num_threads() and callback.share.threads == CORES
    assert (
        f"the machine is busy ({CORES - 1} other tasks running on {CORES} cores): training on 1 thread"
        in caplog.text
    )
    monkeypatch.setattr(thread_tuning, "others_running", lambda: 0.0)
    assert TrainingThreads(tmp_path / "run").threads == CORES  # a quiet machine: the whole share


@needs_two_cores
def test_training_backs_off_a_thread_when_that_is_faster_and_keeps_the_count_when_not(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(thread_tuning, "others_running", lambda: 0.0)  # quiet at the start
    (tmp_path / "run").mkdir()
    callback = TrainingThreads(tmp_path / "run")
    state = SimpleNamespace(global_step=0, max_steps=1000, num_input_tokens_seen=0)
    assert callback.threads == CORES == torch.get_num_threads()
    feed(callback, state, WINDOW_STEPS, speed=300, wait=0.0)  # alone: nothing to try
    assert callback.trial is None
    feed(callback, state, WINDOW_STEPS, speed=110, wait=0.4)  # waiting for CPUs: try one thread fewer
    assert callback.trial is not None and torch.get_num_threads() == CORES - 1
    with caplog.at_level(logging.INFO, logger="lora_studio.thread_tuning"):
        feed(callback, state, 1 + TRIAL_STEPS, speed=220, wait=0.0)  # one step to settle, then measured
    assert callback.trial is None and callback.threads == CORES - 1 == torch.get_num_threads()
    assert f"the machine is busy: {CORES - 1} thread" in caplog.text and "made 220 tokens/s" in caplog.text
    assert json.loads((tmp_path / "run" / "status.json").read_text())["threads"]["threads"] == CORES - 1

    # Later, a try with one thread more (the load may have gone) that loses: back to the fewer.
    feed(callback, state, 40, speed=220, wait=0.0)
    assert callback.trial is not None and torch.get_num_threads() == CORES
    feed(callback, state, 1 + TRIAL_STEPS, speed=120, wait=0.3)
    assert callback.threads == CORES - 1 == torch.get_num_threads()
    assert callback.retry_up == 80  # and it waits longer before the next try


def test_an_explicit_count_is_never_adapted(tmp_path):
    threads.set_explicit(1)
    callback = TrainingThreads(tmp_path / "run")
    state = SimpleNamespace(global_step=0, max_steps=1000, num_input_tokens_seen=0)
    feed(callback, state, 3 * WINDOW_STEPS, speed=100, wait=0.9)
    assert callback.trial is None and torch.get_num_threads() == 1


# --- the worker ------------------------------------------------------------------------------------
@needs_two_cores
@pytest.mark.subprocess
def test_the_worker_hands_each_of_two_concurrent_jobs_its_share(tiny_model_dir, chat_file, studio_home):
    from lora_studio.jobs import JobStore

    store = JobStore()
    recipe = {
        "model": {"base_model": str(tiny_model_dir)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"train_file": str(chat_file), "max_length": 64},
        "train": {"max_steps": 100_000, "per_device_train_batch_size": 4, "eval_every_steps": 50_000},
    }  # long enough to overlap; cancelled once both have settled
    ids = [store.submit({"name": name, **recipe}) for name in ("first", "second")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lora_studio.cli", "worker", "--concurrency", "2", "--poll", "0.1"]
    with open(studio_home / "worker.log", "ab") as log:
        worker = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def shares() -> list[dict]:
        return [threads_status(store.get(i).run_dir) for i in ids]

    try:
        deadline = time.monotonic() + 180
        while not all(s.get("threads") == s.get("share") == CORES // 2 for s in shares()):
            assert time.monotonic() < deadline, f"each job never settled on its share: {shares()}"
            assert worker.poll() is None, (studio_home / "worker.log").read_text()
            time.sleep(0.2)
        first, second = shares()
        said = f"training on {CORES // 2} of {CORES} cores: training run {{}} holds {CORES - CORES // 2}"
        assert second["why"] == said.format(store.get(ids[0]).run_dir.name)
        assert first["why"] == said.format(store.get(ids[1]).run_dir.name)
        assert all(store.get(i).state == "running" for i in ids)
    finally:
        for i in ids:
            store.cancel(i)
        worker.terminate()
        worker.wait(timeout=120)


def threads_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text()).get("threads") or {}
    except (OSError, ValueError):
        return {}
