"""The server under abuse: body limits, a bounded queue, cancelled abandoned requests, strict
parsing (400, never 500), keep-alive after errors, and the event loop free while a big request is
refused. A real uvicorn server on 127.0.0.1 with the tiny model; real HTTP clients."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import httpx
import pytest
from serve_helpers import Started, health_while, running_server

from lora_studio.inference import InferenceEngine
from lora_studio.serve.app import build_app

PROMPT = [{"role": "user", "content": "Repeat: word3"}]
OK = {"model": "base", "messages": PROMPT, "max_tokens": 4}


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> InferenceEngine:
    return InferenceEngine(str(tiny_model_dir))


@pytest.fixture(scope="module")
def server(engine) -> Iterator[str]:
    with running_server(build_app(engine, max_body_mb=1, max_queue=2)) as url:
        yield url


@contextmanager
def engine_busy(engine: InferenceEngine) -> Iterator[None]:
    """Hold the engine's lock, as a long generation would: requests queue behind it."""
    with engine._lock:
        yield


def post(url: str, body: bytes | dict, timeout: float | httpx.Timeout = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers=headers, timeout=timeout)


def assert_openai_error(response: httpx.Response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"], error
    return error


def big_prompt(megabytes: float) -> bytes:
    return json.dumps(
        {**OK, "messages": [{"role": "user", "content": "word " * int(megabytes * 2**20 / 5)}]}
    ).encode()


# --- body size ---------------------------------------------------------------------------------
def test_a_body_over_the_limit_gets_413(server):
    error = assert_openai_error(post(server, big_prompt(2)), 413, "larger than this server's limit of 1 MB")
    assert error["code"] == "request_too_large"


def test_a_chunked_body_over_the_limit_gets_413(server):
    body = big_prompt(2)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: chunked
    response = httpx.post(
        f"{server}/v1/chat/completions",
        content=chunks,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_openai_error(response, 413, "larger than this server's limit")


@pytest.mark.parametrize("max_body_mb", [4, 16])
def test_health_answers_within_a_second_while_a_10_mb_prompt_is_refused(engine, max_body_mb):
    """With the default 4 MB limit the prompt gets 413; with 16 MB it is parsed in a worker thread
    and refused as longer than the context could hold, without tokenising 10 MB (seconds of CPU)."""
    with running_server(build_app(engine, max_body_mb=max_body_mb)) as url:
        slowest, reply = health_while(url, lambda: post(url, big_prompt(10)))
    assert slowest < 1.0, f"/health took {slowest:.2f} s while the big prompt was handled"
    if max_body_mb == 4:
        assert_openai_error(reply, 413)
    else:
        assert_openai_error(reply, 400, "more than can fit in the model's context")


# --- queue and cancellation --------------------------------------------------------------------
def test_a_non_streaming_client_that_leaves_stops_its_generation(engine, server):
    with Started(engine) as started, engine_busy(engine):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            post(server, {**OK, "max_tokens": 100}, timeout=httpx.Timeout(60, read=1.0))
        reply = started.wait_for(1)[0]
        deadline = time.time() + 10
        while not reply._cancelled.is_set():
            assert time.time() < deadline, "the abandoned request was not cancelled"
            time.sleep(0.05)
    reply.wait()
    assert reply.completion_tokens == 0  # cancelled while it queued: it never ran
    assert post(server, OK).status_code == 200


def test_a_streaming_client_that_leaves_while_queued_stops_its_generation(engine, server):
    body = {**OK, "max_tokens": 100, "stream": True}
    with Started(engine) as started, engine_busy(engine):
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as response:
            assert next(response.iter_lines()).startswith("data: ")  # the role event comes at once
        reply = started.wait_for(1)[0]
        deadline = time.time() + 10
        while not reply._cancelled.is_set():  # noticed while it still waits for the engine
            assert time.time() < deadline, "the abandoned stream was not cancelled while it queued"
            time.sleep(0.05)
    reply.wait()
    assert reply.completion_tokens == 0


def test_the_queue_is_bounded_and_429_says_when_to_retry(engine, server):
    answers: list[httpx.Response] = []
    with Started(engine) as started:
        with engine_busy(engine):
            waiting = [threading.Thread(target=lambda: answers.append(post(server, OK))) for _ in range(3)]
            for thread in waiting:
                thread.start()
            started.wait_for(3)  # one would be generating and two waiting: max_queue=2 is full
            refused = post(server, OK)
            error = assert_openai_error(refused, 429, "busy")
            assert error["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
        for thread in waiting:
            thread.join(timeout=60)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert post(server, OK).status_code == 200  # places are given back


# --- strict parsing ----------------------------------------------------------------------------
def raw(text: str) -> bytes:
    return text.encode()


DEEP = '{"model": "base", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
BAD_REQUESTS = {
    "seed beyond int64": ({**OK, "seed": 2**64}, "seed: expected a 64-bit integer"),
    "seed below int64": ({**OK, "seed": -(2**63) - 1}, "seed"),
    "tiny temperature": ({**OK, "temperature": 1e-300}, "temperature: expected 0 (greedy)"),
    "5000-digit integer": (raw('{"model": "base", "max_tokens": ' + "9" * 5000 + "}"), "digits"),
    "25-digit integer": (raw('{"model": "base", "messages": [], "n": ' + "1" * 25 + "}"), "digits"),
    "deep nesting": (raw(DEEP), "nested more than"),
    "nesting in an unused field": (raw('{"model": "base", "x": ' + "[" * 40 + "]" * 40 + "}"), "nested"),
    "lone surrogate in content": (
        raw('{"model": "base", "messages": [{"role": "user", "content": "hi \\ud800"}]}'),
        "messages[0].content: holds a lone UTF-16 surrogate",
    ),
    "lone surrogate in a key": (raw('{"model": "base", "\\udfff": 1, "messages": []}'), "surrogate"),
    "NaN": (raw('{"model": "base", "messages": [], "temperature": NaN}'), "not a JSON number"),
    "Infinity": (raw('{"model": "base", "messages": [], "top_p": -Infinity}'), "not a JSON number"),
    "boolean temperature": ({**OK, "temperature": True}, "temperature: expected a number"),
    "boolean top_p": ({**OK, "top_p": False}, "top_p: expected a number"),
    "boolean max_tokens": ({**OK, "max_tokens": True}, "max_tokens: expected a positive integer"),
    "boolean seed": ({**OK, "seed": True}, "seed"),
    "boolean n": ({**OK, "n": True}, "n: expected an integer"),
    "string stream_options": ({**OK, "stream_options": "yes"}, "stream_options: expected an object"),
    "huge string temperature": ({**OK, "temperature": "x" * 100_000}, "temperature"),
    "huge role": ({**OK, "messages": [{"role": "x" * 100_000, "content": "hi"}]}, "messages[0].role"),
    "invalid UTF-8": (b'{"model": "base", "messages": "\xff\xfe"}', "not valid JSON"),
    "prompt longer than the context": (
        {**OK, "messages": [{"role": "user", "content": "word " * 200_000}]},
        "more than can fit in the model's context",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_short_openai_shaped_400(server, case):
    body, fragment = BAD_REQUESTS[case]
    error = assert_openai_error(post(server, body), 400, fragment)
    assert error["type"] == "invalid_request_error" and len(error["message"]) < 500  # never echoes megabytes


def test_stream_null_means_false(server):
    response = post(server, {**OK, "stream": None})
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"


def test_the_keep_alive_connection_stays_usable_after_every_error(server):
    address = urlparse(server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    bodies = [case[0] for case in BAD_REQUESTS.values()] + [big_prompt(2), b"garbage", {"model": "nope"}]
    connection.request("GET", "/health")
    connection.getresponse().read()
    socket = connection.sock
    statuses = []
    for body in [*bodies, OK]:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", "/v1/chat/completions", content, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
        assert connection.sock is socket and response.getheader("connection") != "close", statuses
    connection.close()
    assert statuses[-1] == 200 and all(400 <= s < 500 for s in statuses[:-1]), statuses
