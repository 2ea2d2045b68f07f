"""Jobs on a real Ray cluster: a local Ray head (2 CPUs) started by the module, stopped at its end.

The head is a process of ours (`ray.init` with a dashboard, for the Job Submission API) in its own
process group, so the teardown stops exactly what it started. One Ray job trains at a time: this
is a 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import test_storage
from test_jobs import loss_rows, make_recipe, wait_for
from test_storage import BUCKET, s3_objects

from lora_studio import adapter_cache, cluster, runs, storage
from lora_studio.cli import main
from lora_studio.errors import ConfigError
from lora_studio.jobs import JobStore
from lora_studio.run_folder import checkpoint_step, last_complete_checkpoint

pytestmark = [pytest.mark.subprocess, pytest.mark.ray]
s3_env = test_storage.s3_env  # a real S3 server for this module (moto), shared with the Ray head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_FLAGS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
)


def _head_command(temp: Path) -> tuple[list[str], str]:
    """`ray start --head --block` on free ports (others may run Ray here too), and its dashboard address."""
    ports = {flag: _free_port() for flag in PORT_FLAGS}
    low = _free_port()
    while any(low <= port <= low + 200 for port in ports.values()):  # workers' ports apart from the rest
        low = _free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2"]
    cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp)]
    cmd += ["--disable-usage-stats", "--min-worker-port", str(low), "--max-worker-port", str(low + 200)]
    for flag, port in ports.items():
        cmd += [f"--{flag}", str(port)]
    return cmd, f"http://127.0.0.1:{ports['dashboard-port']}"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A Ray head with 2 CPUs on this machine; yields its Job Submission address.

    Its node reaches the module's S3 server (test_storage.s3_env) through its own environment,
    as a real node reaches its bucket; without moto the S3 test alone is skipped.

    Stopped by signalling the process we started and then its process group (which Ray's own
    processes share), not by `ray stop`, which would stop every Ray on the machine.
    """
    os.environ["RAY_AUTH_MODE"] = "token"  # Ray 2.5x+ heads want their token (~/.ray/auth_token)
    pytest.importorskip("ray")
    folder = tmp_path_factory.mktemp("ray")
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must be < 108 bytes
    try:
        s3 = request.getfixturevalue("s3_env")
    except pytest.skip.Exception:
        s3 = {}
    env = {**os.environ, **s3, "HF_HUB_OFFLINE": "1", "LORA_STUDIO_HOME": str(folder / "node-home")}
    # A node runs jobs with the `python` on its PATH (the README's setup): here, this test's venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for attempt in range(3):  # a port taken between choosing it and Ray binding it: choose again
        cmd, address = _head_command(temp)
        log_path = folder / f"head-{attempt}.log"
        with open(log_path, "ab") as log:
            head = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

        def up(head: subprocess.Popen = head, log_path: Path = log_path) -> bool:
            return b"will now block" in log_path.read_bytes() or head.poll() is not None

        wait_for(up, 120, "the Ray head")
        if head.poll() is None:
            break
    try:
        assert head.poll() is None, log_path.read_text()[-3000:]
        _wait_for_job_api(address)
        yield address
    finally:
        head.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # what is left of the group `ray start` led
        shutil.rmtree(temp, ignore_errors=True)
        cluster._clients.clear()


def _wait_for_job_api(address: str) -> None:
    """Until a trivial job runs: the dashboard's job agent comes up some seconds after the head."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 120
    while True:
        try:
            submission = client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    wait_for(lambda: client.get_job_status(submission).is_terminal(), 120, "a first Ray job")


def _placement(address: str, storage: Path) -> cluster.Placement:
    return cluster.ray_placement(address, storage)


def test_a_ray_job_succeeds_with_its_run_on_storage_and_chat_loads_it(
    ray_head, tiny_model_dir, chat_file, tmp_path, capsys
):
    storage = tmp_path / "shared"
    store = JobStore()
    started = time.monotonic()
    assert (
        main(
            [
                "jobs",
                "submit",
                str(_write(tmp_path, make_recipe(tiny_model_dir, chat_file, name="on-ray"))),
                "--cluster",
                "ray",
                "--address",
                ray_head,
                "--storage",
                str(storage),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    job_id = out.strip().splitlines()[-1]
    assert f"submitted to the Ray cluster at {ray_head} as lora-studio-{job_id}-1" in out
    job = store.get(job_id)
    assert job.where == f"ray cluster at {ray_head}" and job.queue_position is None
    assert job.run_dir.parent == storage / "runs"
    _wait_until(store, job_id, lambda job: job.state not in ("queued", "running"), 180)
    print(f"ray job: {time.monotonic() - started:.1f} s")  # noqa: T201 (the overhead figure for README)

    job = store.get(job_id)
    assert job.state == "succeeded", (job.error, store.read_log(job_id)[0][-3000:])
    assert job.adapter_dir == job.run_dir / "adapter"
    assert json.loads((job.adapter_dir / "lora_studio.json").read_text())
    assert job.step == 6 and len(loss_rows(store, job_id)) == 6
    log_text, offset = store.read_log(job_id)
    assert "Running entrypoint for job lora-studio-" in log_text and offset > 0
    assert store.read_log(job_id, offset) == ("", offset)

    assert main(["jobs", "show", job_id]) == 0
    shown = capsys.readouterr().out
    assert (
        f"runs on     ray cluster at {ray_head} (lora-studio-{job_id}-1)" in shown and "metrics rows" in shown
    )
    assert runs.adapter_folder("on-ray") == job.adapter_dir  # the index here points at storage
    assert main(["chat", "on-ray", "--max-new-tokens", "4", "--prompt", "Repeat: word1"]) == 0


def test_a_ray_job_on_s3_storage_is_cancelled_resumed_and_chat_loads_its_adapter_once(
    ray_head, s3_env, tiny_model_dir, chat_file, tmp_path, capsys, caplog
):
    """--storage s3://: the node trains in scratch and mirrors to the bucket; `cancel` reaches it
    through the bucket, `resume` continues from the checkpoint there; this machine reads the
    run's copy of its small files, and `chat NAME` downloads the adapter once into the cache."""
    steps = 80
    recipe = _write(
        tmp_path, make_recipe(tiny_model_dir, chat_file, name="on-s3", max_steps=steps, eval_every_steps=4)
    )
    uri = f"s3://{BUCKET}/team"
    args = ["jobs", "submit", str(recipe), "--cluster", "ray", "--address", ray_head, "--storage", uri]
    started = time.monotonic()
    assert main(args) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    store = JobStore()
    job = store.get(job_id)
    assert job.run_dir.parent == storage.face_root(uri) / "runs"
    run_uri = f"{uri}/runs/{job.run_dir.name}"
    assert storage.remote_of(job.run_dir) == run_uri
    _wait_until(store, job_id, lambda job: job.step >= 4 or job.state not in ("queued", "running"), 180)
    assert store.cancel(job_id).cancel_requested  # its request goes into the bucket
    _wait_until(store, job_id, lambda job: job.state not in ("queued", "running"), 60)
    job = store.get(job_id)
    assert job.state == "cancelled" and 4 <= job.step < steps, (job.error, store.read_log(job_id)[0][-3000:])
    assert f"checkpoints/checkpoint-{job.step}/trainer_state.json" in s3_objects(
        f"team/runs/{job.run_dir.name}"
    )

    assert store.resume(job_id).resumes_from_checkpoint  # the checkpoint is seen from here
    cluster.start(store, job_id)
    _wait_until(store, job_id, lambda job: job.state not in ("queued", "running"), 180)
    with capsys.disabled():
        print(f"ray job on s3, cancelled at {job.step} and resumed: {time.monotonic() - started:.1f} s")  # noqa: T201

    job = store.get(job_id)
    assert job.state == "succeeded", (job.error, store.read_log(job_id)[0][-3000:])
    objects = s3_objects(f"team/runs/{job.run_dir.name}")
    assert {
        "adapter/lora_studio.json",
        "adapter/adapter_model.safetensors",
        "status.json",
        "metrics.jsonl",
    } <= set(objects)
    assert job.step == steps and sorted(loss_rows(store, job_id)) == list(range(1, steps + 1))  # each once
    assert main(["jobs", "show", job_id]) == 0
    shown = capsys.readouterr().out
    assert f"storage     {run_uri}" in shown and "metrics rows:" in shown and f"{run_uri}/adapter" in shown

    caplog.set_level(logging.INFO, logger="lora_studio.adapter_cache")
    for _ in range(2):
        assert main(["chat", "on-s3", "--max-new-tokens", "4", "--prompt", "Repeat: word1"]) == 0
    downloads = [r for r in caplog.records if r.getMessage().startswith("downloading the adapter")]
    assert len(downloads) == 1  # the second chat loaded the cached copy
    assert runs.adapter_folder("on-s3") == adapter_cache.cache_folder(run_uri) / "adapter"


def test_several_workers_with_object_storage_are_refused_in_one_line(
    ray_head, s3_env, tiny_model_dir, chat_file
):
    store = JobStore()
    pair = make_recipe(tiny_model_dir, chat_file, name="two-s3", num_workers=2)
    job_id = store.submit(pair, placement=cluster.ray_placement(ray_head, f"s3://{BUCKET}/team"))
    with pytest.raises(
        ConfigError, match=r"train.num_workers: 2 with object storage \(s3://.*\) is not supported yet"
    ):
        cluster.start(store, job_id)
    job = store.get(job_id)
    assert job.state == "failed" and "give --storage a folder every node sees" in job.error


def _start_until_step(
    store: JobStore, recipe: dict, placement: cluster.Placement, step: int, timeout: float
) -> tuple[str, Path]:
    """Submit and hand over a job, and wait until its run folder is at `step` (or it ended)."""
    job_id = store.submit(recipe, placement=placement)
    cluster.start(store, job_id)
    run_dir = store.get(job_id).run_dir
    _wait_until(
        store,
        job_id,
        lambda job: runs.read_run(run_dir).step >= step or job.state not in ("queued", "running"),
        timeout,
    )
    return job_id, run_dir


def _wait_until(store: JobStore, job_id: str, condition, timeout: float) -> None:
    """wait_for, telling the job's state and log tail when it times out."""
    try:
        wait_for(lambda: condition(store.get(job_id)), timeout, f"job {job_id}")
    except AssertionError as e:
        job = store.get(job_id)
        raise AssertionError(f"{e}: {job.state} {job.error}\n{store.read_log(job_id)[0][-3000:]}") from None


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / f"{recipe['name']}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def test_without_ray_the_cluster_option_is_one_line(monkeypatch, tiny_model_dir, chat_file, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray.job_submission", None)  # as if Ray were not installed
    with pytest.raises(
        ConfigError, match=r"needs Ray, which is not installed: pip install 'lora-studio\[ray\]'"
    ):
        cluster.ray_placement("http://127.0.0.1:8265")
    recipe = _write(tmp_path, make_recipe(tiny_model_dir, chat_file))
    assert main(["jobs", "submit", str(recipe), "--cluster", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lora-studio[ray]'" in err
    assert JobStore().list() == []


def test_cancel_stops_a_ray_job_at_a_checkpoint_and_resume_survives_a_sigkill(
    ray_head, tiny_model_dir, chat_file, tmp_path
):
    """Cancel a running Ray job, resume it, SIGKILL its process (as the OOM killer would), resume
    again: it ends at the uninterrupted run's last step, each step logged once, the kept rows untouched."""
    store = JobStore()
    recipe = make_recipe(tiny_model_dir, chat_file, name="stop-go", max_steps=60, eval_every_steps=4)
    job_id, run_dir = _start_until_step(store, recipe, _placement(ray_head, tmp_path / "shared"), 5, 120)
    assert store.cancel(job_id).cancel_requested
    _wait_until(store, job_id, lambda job: job.state not in ("queued", "running"), 60)
    job = store.get(job_id)
    assert job.state == "cancelled" and 5 <= job.step < 60, job.error
    assert (run_dir / "checkpoints" / f"checkpoint-{job.step}" / "trainer_state.json").is_file()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "cancelled"
    cancelled_at = job.step

    assert store.resume(job_id).resumes_from_checkpoint
    cluster.start(store, job_id)
    _wait_until(
        store,
        job_id,
        lambda job: runs.read_run(run_dir).step >= cancelled_at + 6 or job.state not in ("queued", "running"),
        120,
    )
    os.kill(runs.read_status(run_dir)["pid"], signal.SIGKILL)
    _wait_until(store, job_id, lambda job: job.state != "running", 60)
    killed = store.get(job_id)
    assert killed.state == "interrupted" and killed.attempts == 2, killed.error
    before = loss_rows(store, job_id)
    checkpoint = checkpoint_step(last_complete_checkpoint(run_dir))  # the kill may cut a save short
    assert cancelled_at < checkpoint <= max(before)

    assert store.resume(job_id).resumes_from_checkpoint
    cluster.start(store, job_id)
    _wait_until(store, job_id, lambda job: job.finished, 180)
    done = store.get(job_id)
    assert done.state == "succeeded" and done.attempts == 3, done.error
    assert done.step == done.total_steps == 60
    after = loss_rows(store, job_id)
    assert sorted(after) == list(range(1, 61))
    changed = [(after[s], before[s]) for s in range(1, checkpoint + 1) if after[s] != before[s]]
    assert not changed, changed[:2]  # kept, not rerun
    log_text = store.read_log(job_id)[0]
    assert all(f"lora-studio-{job_id}-{n}" in log_text for n in (1, 2, 3))  # every attempt's log


def test_two_ray_train_workers_train_the_tiny_model_like_one_process(
    ray_head, tiny_model_dir, chat_file, tmp_path
):
    """num_workers: 2 on CPU (gloo), 2 examples each, against one process with batches of 4."""
    from lora_studio.config import Recipe
    from lora_studio.training import train

    single = make_recipe(tiny_model_dir, chat_file, name="one", output_dir=str(tmp_path / "one"))
    alone = train(Recipe.from_dict(single))
    store = JobStore()
    pair = make_recipe(tiny_model_dir, chat_file, name="two", per_device_train_batch_size=2, num_workers=2)
    job_id = store.submit(pair, placement=_placement(ray_head, tmp_path / "shared"))
    cluster.start(store, job_id)
    _wait_until(store, job_id, lambda job: job.state not in ("queued", "running"), 240)
    job = store.get(job_id)
    assert job.state == "succeeded", job.error
    assert (job.adapter_dir / "lora_studio.json").is_file() and job.step == 6
    log_text = store.read_log(job_id)[0]
    assert "training on 2 Ray Train workers (CPU, gloo), global batch 4" in log_text
    assert "fast path: no cache: training runs in several processes" in log_text  # left out, said once
    two, one = job.metrics["train_loss"], alone.metrics["train_loss"]
    print(f"train_loss: 1 process {one:.4f}, 2 Ray Train workers {two:.4f}")  # noqa: T201
    assert job.metrics["world_size"] == 2 and alone.metrics["world_size"] == 1
    # The same global batches, split over two processes (gradients averaged by DDP): measured equal
    # to 1e-4 here; allow for summation order and a different token normalisation per rank.
    assert abs(two - one) < 0.01


def test_cancel_stops_two_ray_train_workers_at_the_next_step_with_a_checkpoint(
    ray_head, tiny_model_dir, chat_file, tmp_path
):
    store = JobStore()
    pair = make_recipe(
        tiny_model_dir,
        chat_file,
        name="two-stop",
        per_device_train_batch_size=2,
        num_workers=2,
        max_steps=200,
    )
    job_id, run_dir = _start_until_step(store, pair, _placement(ray_head, tmp_path / "shared"), 4, 240)
    asked_at = runs.read_run(run_dir).step
    assert store.cancel(job_id).cancel_requested
    _wait_until(store, job_id, lambda job: job.state not in ("queued", "running"), 120)
    job = store.get(job_id)
    assert job.state == "cancelled", (job.error, store.read_log(job_id)[0][-3000:])
    print(f"2 workers: cancel asked at step {asked_at}, stopped at {job.step}")  # noqa: T201
    # The next step, give or take the steps that ran while the cancel was being written.
    assert asked_at <= job.step <= asked_at + 5 and job.attempts == 1, job.error
    assert (run_dir / "checkpoints" / f"checkpoint-{job.step}" / "trainer_state.json").is_file()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "cancelled"
    log_text = store.read_log(job_id)[0]
    assert log_text.count("Setting up process group for") == 1, log_text[-3000:]  # no group restart


@pytest.mark.browser
def test_the_train_tab_submits_to_the_ray_cluster_and_remembers_the_choice(
    ray_head, tiny_model_dir, tmp_path
):
    from test_ui_e2e import BROWSER_ARGS, CHROMIUM, chat_rows, pick_dropdown, running_ui, upload

    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    with running_ui(home, cwd) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS
        )
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        pick_dropdown(page, "data-base-model", str(tiny_model_dir))  # as test_ui_e2e's page does
        upload(page, "chat.jsonl", chat_rows().encode())  # the Data tab; the Train tab follows it
        page.locator("#data-summary").get_by_text("36", exact=False).wait_for()
        page.locator("#data-samples mark").first.wait_for()
        page.get_by_role("tab", name="Train").click()
        pick_dropdown(page, "train-base-model", str(tiny_model_dir))
        assert "chat-" in page.locator("#train-dataset input").input_value()
        page.get_by_text("More settings").click()
        for label, value in [("Max steps", "6"), ("Batch size", "4"), ("Max length (tokens)", "64")]:
            page.locator("#train-form").get_by_label(label, exact=True).fill(value)
        page.locator("#train-where").get_by_text("Ray cluster", exact=True).click()
        page.locator("#train-ray-address input, #train-ray-address textarea").fill(ray_head)
        page.locator("#train-ray-address input, #train-ray-address textarea").blur()
        page.locator("#train-start").click()
        try:
            page.locator("#train-command").get_by_text("--cluster ray", exact=False).wait_for()
        except Exception:
            page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
            raise
        jobs = page.locator("#train-jobs")
        jobs.get_by_test_id("cell-0-8").get_by_text("ray", exact=True).wait_for()  # "runs on": the cluster

        page.reload()  # the choice is remembered (in the studio home)
        page.get_by_role("tab", name="Train").click()
        ray_choice = page.locator("#train-where").get_by_label("Ray cluster", exact=True)
        wait_for(ray_choice.is_checked, 30, "the remembered choice")
        assert page.locator("#train-ray-address input, #train-ray-address textarea").input_value() == ray_head
        browser.close()
    store = JobStore(home / "jobs.sqlite")
    (job,) = store.list()
    assert job.cluster == "ray" and job.cluster_address == ray_head and job.submission_id
    _wait_until(store, job.id, lambda j: j.finished, 180)
    assert store.get(job.id).state == "succeeded"
