"""The web UI end to end: a real `lora-studio ui` process, driven by headless Chromium and by gradio_client.

The server runs on a free loopback port with its own LORA_STUDIO_HOME; the base model is the
tiny in-process-built Llama, typed into the form as a local folder. Training goes through the
real job service (a worker process), chat through the real inference engine. Screenshots of
each browser step are saved under test-artifacts/ui/.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # a real `lora-studio ui` process (and its job worker)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_UPLOAD_MB = 1
TRAIN_TIMEOUT_S = 240  # the tiny model trains in seconds; the worker's start and imports take longer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_ui(home: Path, cwd: Path, *extra: str) -> Iterator[str]:
    """Start `lora-studio ui` as a real process; yield its URL; stop it and the worker it started."""
    port = free_port()
    env = dict(os.environ, LORA_STUDIO_HOME=str(home), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(cwd / f"ui-{port}.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lora_studio.cli",
            "ui",
            "--port",
            str(port),
            "--max-upload-mb",
            str(MAX_UPLOAD_MB),
            *extra,
        ],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the UI exited with {proc.returncode}:\n{(cwd / log.name).read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("the UI did not answer within 180 s")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        stop_worker(home)


def stop_worker(home: Path) -> None:
    """The job service's worker outlives the UI on purpose; a test must not leave it running."""
    from lora_studio.jobs import JobStore

    pid = JobStore(home / "jobs.sqlite").worker_pid()
    if pid:
        os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("ui-e2e")
    home, cwd = root / "home", root / "cwd"
    home.mkdir()
    cwd.mkdir()
    with running_ui(home, cwd) as url:
        yield {"url": url, "home": home, "cwd": cwd, "model": tiny_model_dir}


@pytest.fixture(scope="module")
def trained_adapter(ui_server: dict) -> Path:
    """An adapter of its own for the chat tests: a short run trained as `lora-studio train` would,
    from the UI's folder and studio home, with the default run folder, so the UI lists it."""
    from lora_studio import Recipe, train

    data = ui_server["cwd"] / "chat-fixture.jsonl"
    data.write_text(chat_rows())
    recipe = Recipe.from_dict(
        {
            "name": "e2e-chat",
            "model": {"base_model": str(ui_server["model"])},
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "data": {"train_file": str(data), "max_length": 64},
            "train": {"max_steps": 4, "per_device_train_batch_size": 4, "eval_every_steps": 2},
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_STUDIO_HOME", str(ui_server["home"]))
        patch.chdir(ui_server["cwd"])
        return Path(train(recipe).adapter_dir).resolve()


def chat_rows(n: int = 40) -> str:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Repeat: word{i % 20}"},
                {"role": "assistant", "content": f"word{i % 20}"},
            ]
        }
        for i in range(n)
    ]
    return "\n".join(json.dumps(r) for r in rows) + "\n"


# --- browser ---------------------------------------------------------------------------------------
needs_browser = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian chromium at /usr/bin/chromium (scripts/install-browser.sh installs it)",
)


@pytest.fixture
def page(tmp_path: Path, ui_server: dict, request: pytest.FixtureRequest):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=BROWSER_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(ui_server["url"])
        page.wait_for_selector("#data-upload")
        # Render examples with the tiny model's template (the built-in default would be converted first).
        pick_dropdown(page, "data-base-model", str(ui_server["model"]))
        try:
            yield page
        finally:  # the page as the test left it, to see what went wrong
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            name = re.sub(
                r"[^A-Za-z0-9_.-]+", "_", request.node.name
            )  # test ids may hold '/' (traversal cases)
            page.screenshot(path=str(ARTIFACTS / f"last-{name}.png"), full_page=True)
            (ARTIFACTS / f"last-{name}.html").write_text(page.content())
            context.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def upload(page, name: str, content: bytes) -> None:
    page.locator("#data-upload input[type=file]").set_input_files(
        {"name": name, "mimeType": "application/octet-stream", "buffer": content}
    )


def settled_text(locator, quiet_s: float = 2.0, timeout_s: float = 120) -> str:
    """The locator's text once it appears and stops changing (a streamed answer has ended)."""
    locator.wait_for(timeout=timeout_s * 1000)
    last, since, deadline = None, time.time(), time.time() + timeout_s
    while time.time() < deadline:
        text = locator.inner_text()
        if text != last:
            last, since = text, time.time()
        elif text.strip() and time.time() - since >= quiet_s:
            return text
        time.sleep(0.2)
    return last or ""


def pick_dropdown(page, elem_id: str, text: str) -> None:
    """Type into a gradio dropdown that accepts custom values, and confirm with Enter."""
    box = page.locator(f"#{elem_id} input")
    box.fill(text)
    box.press("Enter")


@pytest.mark.browser
@needs_browser
def test_train_in_the_browser(page, ui_server: dict, tmp_path: Path):
    shot(page, "01-data-tab")
    upload(page, "chat.jsonl", chat_rows().encode())
    summary = page.locator("#data-summary")
    summary.get_by_text("36", exact=False).wait_for()
    assert "format messages" in summary.inner_text()
    page.locator("#data-samples mark").first.wait_for()
    shot(page, "02-data-checked")

    page.get_by_role("tab", name="Train").click()
    box = page.locator("#train-max-length input")
    for task, length in [("classify", ""), ("chat", "512")]:  # classify: max_length from the data
        page.locator("#train-task input").click()
        page.get_by_role("option", name=task, exact=True).click()
        page.wait_for_function(
            "([box, want]) => box.value === want", arg=[box.element_handle(), length], timeout=10_000
        )
    pick_dropdown(page, "train-base-model", str(ui_server["model"]))
    assert "chat-" in page.locator("#train-dataset input").input_value()  # followed the Data tab's upload
    page.get_by_text("More settings").click()
    for label, value in [
        ("Max steps", "6"),
        ("Batch size", "4"),
        ("Validate every N steps", "3"),
        ("Log loss every N steps", "1"),
        ("Learning rate", "0.005"),
        ("Max length (tokens)", "64"),
    ]:
        page.locator("#train-form").get_by_label(label, exact=True).fill(value)
    page.locator("#train-start").click()
    progress = page.locator("#train-progress")
    progress.get_by_text("running", exact=False).or_(progress.get_by_text("queued", exact=False)).wait_for()
    assert "lora-studio train" in page.locator("#train-command").inner_text()
    shot(page, "03-training")
    page.locator('#train-progress [data-state="succeeded"]').wait_for(timeout=TRAIN_TIMEOUT_S * 1000)
    assert "100%" in progress.inner_text()
    shot(page, "04-trained")

    page.reload()  # the job list comes from the store, not from the page
    page.get_by_role("tab", name="Train").click()
    page.locator('#train-progress [data-state="succeeded"]').wait_for()
    assert "succeeded" in page.locator("#train-jobs").inner_text()


@pytest.mark.browser
@needs_browser
def test_chat_in_the_browser(trained_adapter: Path, page):
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-model input").click()
    page.get_by_role("option", name="e2e-chat", exact=False).first.click()
    page.locator("#chat-message textarea").fill("Repeat: word3")
    page.locator("#chat-send").click()
    assert settled_text(page.locator("#chat-left [data-testid=bot]").last)  # a non-empty streamed answer
    shot(page, "05-chat")


@pytest.mark.browser
@needs_browser
@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("huge.jsonl", b"x" * (MAX_UPLOAD_MB * 2**20 + 1000), "exceed the maximum allowed size"),
        ("notes.txt", b"hello", "Invalid file type"),
        ("../../../evil.jsonl", chat_rows(3).encode(), "has folder parts"),
    ],
    ids=["oversized", "wrong-type", "path-traversal"],
)
def test_bad_uploads_show_a_clear_error(page, ui_server: dict, name: str, content: bytes, expected: str):
    upload(page, name, content)
    page.locator(".toast-body").get_by_text(expected, exact=False).wait_for()
    shot(page, f"error-{Path(name).stem}")
    root, received = ui_server["home"].parent, ui_server["home"] / "gradio"  # gradio's own upload cache
    assert not [p for p in root.rglob("evil*") if received not in p.parents]  # nothing stored outside it
    for base in (ui_server["home"] / "uploads", received, ui_server["cwd"]):
        assert not (base / name).resolve().exists()  # nor where the name points


@pytest.mark.browser
@needs_browser
def test_malformed_file_shows_the_bad_line(page, ui_server: dict):
    good = json.dumps({"prompt": "a", "completion": "b"})
    upload(page, "broken.jsonl", f"{good}\n{good}\n{{oops\n".encode())
    page.locator("#data-summary").get_by_text("line 3", exact=False).wait_for()
    assert "not valid JSON" in page.locator("#data-summary").inner_text()
    shot(page, "error-malformed")


# --- the same flow through the app's API (gradio_client) -------------------------------------------
def wait_for_job(client, job_id: str, timeout_s: float = TRAIN_TIMEOUT_S) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        progress, _plot, _table = client.predict(job_id, api_name="/watch_job")
        if any(
            f'data-state="{state}"' in progress
            for state in ("succeeded", "failed", "cancelled", "interrupted")
        ):
            return progress
        time.sleep(1)
    pytest.fail(f"job {job_id} did not finish within {timeout_s} s: {progress}")


def test_train_chat_and_download_through_the_api(ui_server: dict, tmp_path: Path):
    from gradio_client import Client, handle_file

    client = Client(ui_server["url"], verbose=False, download_files=str(tmp_path / "downloads"))
    data = tmp_path / "chat.jsonl"
    data.write_text(chat_rows())
    stored = client.predict(handle_file(str(data)), api_name="/upload_dataset")
    assert (
        Path(stored).parent == ui_server["home"] / "uploads" and Path(stored).read_text() == data.read_text()
    )
    summary, samples = client.predict(stored, str(ui_server["model"]), "auto", 64, api_name="/check_dataset")
    assert "format **messages**" in summary and "ls-learn" in samples

    form = ["api-run", str(ui_server["model"]), stored, 4, 0, "none", 1, 5e-3, 64, 6, 4, 3, 1]
    job_id, command = client.predict(*form, api_name="/start_training")
    assert "lora-studio train" in command
    progress = wait_for_job(client, job_id)
    assert 'data-state="succeeded"' in progress and "100%" in progress
    _, plot, table = client.predict(job_id, api_name="/watch_job")
    assert job_id in [row[0] for row in table["data"]]
    assert plot is not None  # the loss curve had points

    adapter = ui_server["home"] / "runs" / f"api-run-{job_id}" / "adapter"
    summary, recipe = client.predict(str(adapter), api_name="/describe_adapter")
    assert str(adapter) in summary and "train_loss" in summary.replace(" ", "_") and "r: 4" in recipe
    reply = client.submit("Repeat: word3", [], [], f"adapter:{adapter}", True, "", 24, 0, api_name="/chat")
    left, right, box = reply.result()
    assert box == "" and left[-1]["role"] == "assistant" and right[-1]["role"] == "assistant"
    assert _text(left[-1]).strip() and _text(right[-1]).strip()
    assert len(reply.outputs()) > 3  # streamed: many partial answers, not one final message

    archive, note = client.predict(str(adapter), api_name="/download_adapter")
    assert "adapter_model.safetensors" in " ".join(zipfile.ZipFile(archive).namelist()) and "ready" in note
    archive, note = client.predict(str(adapter), api_name="/download_merged")
    names = zipfile.ZipFile(archive).namelist()
    assert any(n.endswith("model.safetensors") for n in names) and not any(
        "adapter_model" in n for n in names
    )


def test_jobs_survive_a_ui_restart_and_auth_guards_the_page(ui_server: dict, tmp_path: Path):
    """A second UI process on the same studio folder, behind --auth, lists the jobs the first one ran."""
    from gradio_client import Client

    from lora_studio.jobs import JobStore

    jobs = JobStore(ui_server["home"] / "jobs.sqlite").list()
    if not jobs:
        pytest.skip("no job has run on this server yet (run with the training tests)")
    with running_ui(ui_server["home"], tmp_path, "--auth", "ann:s3cret") as url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}config", timeout=10)
        assert refused.value.code == 401
        client = Client(url, auth=("ann", "s3cret"), verbose=False)
        progress, _, table = client.predict(jobs[0].id, api_name="/watch_job")
    assert {j.id for j in jobs} <= {row[0] for row in table["data"]}
    assert f'data-state="{jobs[0].state}"' in progress


def test_api_refuses_a_file_outside_the_upload_folder(ui_server: dict, tmp_path: Path):
    """A crafted API call naming a server path must not read it: only files the client uploaded count.

    gradio_client would upload a local file itself, so the request is sent by hand, as an attacker would.
    Gradio refuses such a path before the handler runs; the handler checks again (test_ui.py covers it).
    """
    secret = tmp_path / "secret.jsonl"
    secret.write_text(chat_rows(2))
    payload = {"path": str(secret), "orig_name": "secret.jsonl", "meta": {"_type": "gradio.FileData"}}
    call = f"{ui_server['url']}gradio_api/call/upload_dataset"
    request = urllib.request.Request(
        call, data=json.dumps({"data": [payload]}).encode(), headers={"Content-Type": "application/json"}
    )
    event_id = json.load(urllib.request.urlopen(request, timeout=30))["event_id"]
    stream = urllib.request.urlopen(f"{call}/{event_id}", timeout=60).read().decode()
    assert "event: error" in stream and "event: complete" not in stream
    assert not list((ui_server["home"] / "uploads").glob("secret*"))


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
