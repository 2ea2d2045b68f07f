"""`lora-studio serve` as a real process on a free loopback port: the official openai client, raw HTTP
errors in OpenAI's shape, the API key, and concurrent requests to different adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lora_studio.inference import InferenceEngine
from lora_studio.serve.local import free_port

pytestmark = pytest.mark.subprocess  # a real `lora-studio serve` process

KEY = "test-key-123"
PROMPT = [{"role": "user", "content": "Repeat: word3"}]
N = 10


def lora_studio_command() -> list[str]:
    script = Path(sys.executable).parent / "lora-studio"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lora_studio.cli"]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-log") / "server.log"


@pytest.fixture(scope="module")
def server(tiny_adapters, tmp_path_factory, server_log) -> Iterator[str]:
    """The server with adapters alpha and beta; its key comes from the environment variable."""
    home, port, log = tmp_path_factory.mktemp("serve-home"), free_port(), server_log
    env = {**os.environ, "LORA_STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1", "LORA_STUDIO_API_KEY": KEY}
    cmd = [
        *lora_studio_command(),
        "serve",
        f"alpha={tiny_adapters['alpha']}",
        str(tiny_adapters["beta"]),
        "--port",
        str(port),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"the server did not start: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def expected(tiny_model_dir, tiny_adapters) -> dict[str, str]:
    """Each model's greedy answer, computed in this process."""
    engine = InferenceEngine(str(tiny_model_dir))
    for name, path in tiny_adapters.items():
        engine.load_adapter(name, path)
    return {
        name: engine.chat(PROMPT, None if name == "base" else name, max_new_tokens=N)
        for name in ["alpha", "beta", "base"]
    }


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_the_base_and_every_adapter(client, tiny_model_dir):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {Path(tiny_model_dir).name, "alpha", "beta"}
    assert models["alpha"].owned_by == "lora-studio"


def test_openai_client_non_streaming_gets_each_models_own_answer(client, expected):
    for model in ["alpha", "beta", "base"]:
        reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=N, temperature=0)
        assert reply.choices[0].message.content == expected[model]
        assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
        assert (
            reply.usage.completion_tokens == N and reply.usage.total_tokens == reply.usage.prompt_tokens + N
        )


def test_openai_client_streaming(client, expected):
    stream = client.chat.completions.create(
        model="beta", messages=PROMPT, max_tokens=N, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["beta"]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == N


def test_concurrent_requests_to_two_adapters_get_their_own_answers(client, expected):
    models = ["alpha", "beta", "alpha", "beta", "base", "beta"]

    def ask(model: str) -> str:
        if model == "beta":
            stream = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=N, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return (
            client.chat.completions.create(model=model, messages=PROMPT, max_tokens=N)
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(ask, models))
    assert answers == [expected[m] for m in models]


def post(server: str, body: bytes | dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server}/v1/chat/completions",
        content=content,
        timeout=30,
        headers={**headers, "Content-Type": "application/json"},
    )


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"model": "alpha", "messages": [', 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"messages": PROMPT}, 400, "model: required"),
        ({"model": "gamma", "messages": PROMPT}, 404, "'gamma' does not exist"),
        ({"model": "alpha"}, 400, "messages: required"),
        ({"model": "alpha", "messages": []}, 400, "messages"),
        ({"model": "alpha", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ({"model": "alpha", "messages": PROMPT, "max_tokens": 10**9}, 400, "exceed the model's context"),
        ({"model": "alpha", "messages": PROMPT, "max_tokens": 0}, 400, "max_tokens: expected a positive"),
        (
            {"model": "alpha", "messages": PROMPT, "max_tokens": "many"},
            400,
            "max_tokens: expected a positive",
        ),
        ({"model": "alpha", "messages": PROMPT, "temperature": 9}, 400, "temperature"),
        ({"model": "alpha", "messages": PROMPT, "n": 3}, 400, "n: only 1"),
        ({"model": "alpha", "messages": PROMPT, "stop": ["\n"]}, 400, "stop"),
        ({"model": "alpha", "messages": PROMPT, "stream": "yes"}, 400, "stream"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx_errors(server, body, status, fragment):
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_api_key_is_required_and_checked(server):
    for key in [None, "wrong-key"]:
        response = post(server, {"model": "alpha", "messages": PROMPT, "max_tokens": 2}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200  # liveness needs no key
    assert post(server, {"model": "alpha", "messages": PROMPT, "max_tokens": 2}).status_code == 200


def test_unknown_paths_and_methods_are_openai_shaped_too(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    missing = httpx.get(f"{server}/v1/nothing", headers=headers, timeout=10)
    assert missing.status_code == 404 and "message" in missing.json()["error"]
    wrong_method = httpx.get(f"{server}/v1/chat/completions", headers=headers, timeout=10)
    assert wrong_method.status_code == 405 and "message" in wrong_method.json()["error"]
    assert httpx.get(f"{server}/v1/models/gamma", headers=headers, timeout=10).status_code == 404


def test_the_server_survives_bad_requests(client, expected, server):
    post(server, b"garbage")
    post(server, {"model": "alpha", "messages": PROMPT, "max_tokens": 10**9})
    reply = client.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=N)
    assert reply.choices[0].message.content == expected["alpha"]


def test_serve_without_anything_to_serve_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [*lora_studio_command(), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LORA_STUDIO_HOME": str(tmp_path)},
    )
    assert done.returncode == 2 and done.stderr.strip().startswith("error: nothing to serve")


def test_text_parts_content_is_accepted(server, expected):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Repeat: "}, {"type": "text", "text": "word3"}]}
    ]
    response = post(server, {"model": "alpha", "messages": parts, "max_tokens": N})
    assert (
        response.status_code == 200
        and response.json()["choices"][0]["message"]["content"] == expected["alpha"]
    )


def test_a_client_leaving_mid_stream_stops_its_generation(server, server_log, expected, client):
    body = {"model": "alpha", "messages": PROMPT, "max_tokens": 200, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    # the server notices, stops that generation, and keeps answering others correctly
    reply = client.chat.completions.create(model="beta", messages=PROMPT, max_tokens=N)
    assert reply.choices[0].message.content == expected["beta"]
    assert "a client left mid-stream: its generation was stopped" in server_log.read_text()
