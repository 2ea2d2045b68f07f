"""A seeded fuzz of the API server: over 600 requests over every abuse class (oversized and chunked
bodies, huge integers, deep nesting, lone surrogates, booleans for numbers, tiny temperatures, int64
overflows, mangled JSON, wrong keys, clients that leave mid-answer) mixed with valid requests, against
a real uvicorn server on 127.0.0.1 with the tiny model. Asserts: no response >= 500, /health always
under a second (probed throughout from another thread), and the server still answers correctly.
Run with -s to see the counts by status; the assertion messages hold them too."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import running_server

from lora_studio.inference import InferenceEngine
from lora_studio.serve.app import build_app

SEED = 8
ROUNDS = 420  # each sends one request, or a burst of BURST at once: over 500 requests in all
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n"]
NUMERIC = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapters) -> Iterator[str]:
    engine = InferenceEngine(str(tiny_model_dir))
    engine.load_adapter("alpha", tiny_adapters["alpha"])
    with running_server(build_app(engine, KEY, max_body_mb=1, max_queue=4)) as url:
        yield url


# --- request makers: each returns (body bytes, how to send it) ----------------------------------
def valid(rng: random.Random) -> dict:
    body = {
        "model": rng.choice(["base", "alpha"]),
        "messages": [{"role": "user", "content": f"Repeat: word{rng.randrange(10)}"}],
        "max_tokens": rng.randint(1, 8),
    }
    if rng.random() < 0.5:
        body.update(
            temperature=rng.choice([0, 0.7, 1.3]), top_p=rng.choice([0.5, 1]), seed=rng.randrange(2**63)
        )
    if rng.random() < 0.3:
        body["stream"] = rng.choice([True, False, None])
    return body


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()


def with_raw(body: dict, field: str, raw: str) -> bytes:
    """`body` with `field` set to a raw JSON text (things json.dumps will not write)."""
    return encode({**body, field: "@RAW@"}).replace(b'"@RAW@"', raw.encode("utf-8", "surrogatepass"))


def huge_integer(rng: random.Random) -> bytes:
    digits = rng.choice([21, 25, 300, 4301, 5000, 20000])
    return with_raw(valid(rng), rng.choice(FIELDS), rng.choice(["", "-"]) + "9" * digits)


def int64_overflow(rng: random.Random) -> bytes:
    seed = rng.choice([2**63, 2**64, 2**64 + 1, -(2**63) - 1, 10**19])
    return encode({**valid(rng), "seed": seed})


def tiny_or_wild_temperature(rng: random.Random) -> bytes:
    value = rng.choice([1e-300, 5e-324, 1e-10, 1e-4, -1e-300, -0.5, 2.0001, 1e308])
    return encode({**valid(rng), "temperature": value})


def deep_nesting(rng: random.Random) -> bytes:
    depth = rng.choice([33, 100, 1000, 5000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    return with_raw(valid(rng), rng.choice([*FIELDS, "extra"]), opener * depth + "1" + closer * depth)


def lone_surrogate(rng: random.Random) -> bytes:
    surrogate = rng.choice(["\\ud800", "\\udfff", "\\udbff\\u0041"])
    where = rng.choice(["content", "model", "key", "role"])
    body = valid(rng)
    if where == "content":
        return with_raw(body, "messages", f'[{{"role": "user", "content": "hi {surrogate} there"}}]')
    if where == "key":
        return encode(body)[:-1] + f', "{surrogate}": 1}}'.encode()
    if where == "role":
        return with_raw(body, "messages", f'[{{"role": "{surrogate}", "content": "hi"}}]')
    return with_raw(body, "model", f'"{surrogate}"')


def boolean_for_number(rng: random.Random) -> bytes:
    return encode({**valid(rng), rng.choice(NUMERIC): rng.choice([True, False])})


def odd_stream(rng: random.Random) -> bytes:
    return encode({**valid(rng), "stream": rng.choice([None, 0, 1, "true", [], {}]), "stream_options": None})


def junk_value(rng: random.Random) -> bytes:
    junk = [None, "", "x" * rng.randint(1, 5000), [], {}, [1, 2], {"a": 1}, -1, 0, 1.5, -0.0, 1e308, 10**18]
    return encode({**valid(rng), rng.choice([*FIELDS, "stop", "stream_options"]): rng.choice(junk)})


def odd_messages(rng: random.Random) -> bytes:
    messages = rng.choice(
        [
            [],
            "hello",
            [{"role": "robot", "content": "hi"}],
            [{"role": "user", "content": 5}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            [{"role": "user", "content": "\x00 nul \u202e bidi \U0001f600"}],
            [{"role": "user", "content": "word " * 2000}],
        ]
    )
    return encode({**valid(rng), "messages": messages})


def mangled_json(rng: random.Random) -> bytes:
    data = bytearray(encode(valid(rng)))
    for _ in range(rng.randint(1, 4)):
        cut = rng.randrange(len(data))
        action = rng.choice(["flip", "cut", "insert"])
        if action == "flip":
            data[cut] = rng.randrange(256)
        elif action == "cut":
            del data[cut:]
            if not data:
                break
        else:
            data[cut:cut] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


def oversized(rng: random.Random) -> bytes:
    size = rng.choice([1.01, 1.5, 3]) * 2**20
    return encode({**valid(rng), "messages": [{"role": "user", "content": "a" * int(size)}]})


MAKERS: dict[str, Callable[[random.Random], bytes | dict]] = {
    "valid": valid,
    "huge integer": huge_integer,
    "int64 overflow": int64_overflow,
    "temperature": tiny_or_wild_temperature,
    "deep nesting": deep_nesting,
    "lone surrogate": lone_surrogate,
    "boolean for number": boolean_for_number,
    "odd stream": odd_stream,
    "junk value": junk_value,
    "odd messages": odd_messages,
    "mangled JSON": mangled_json,
    "oversized": oversized,
}
SENDS = ["plain"] * 5 + ["chunked", "wrong key", "abandon", "abandon stream", "burst"]
BURST = 8  # concurrent copies of one request: more than the queue holds (max_queue=4)


# --- sending -----------------------------------------------------------------------------------
def send(client: httpx.Client, url: str, body: bytes, how: str) -> list[str]:
    """Send `body` as `how` says; the status codes, or what the clients saw instead."""
    if how == "burst":
        with ThreadPoolExecutor(BURST) as pool:
            return list(pool.map(lambda _: outcome(client, url, body, "plain"), range(BURST)))
    return [outcome(client, url, body, how)]


def outcome(client: httpx.Client, url: str, body: bytes, how: str) -> str:
    try:
        return send_one(client, url, body, how)
    except httpx.HTTPError as e:  # the connection broke: the server must never do that
        return f"client error {type(e).__name__}"


def send_one(client: httpx.Client, url: str, body: bytes, how: str) -> str:
    target = f"{url}/v1/chat/completions"
    if how == "wrong key":
        return str(
            client.post(target, content=body, headers={**AUTH, "Authorization": "Bearer nope"}).status_code
        )
    if how == "chunked":
        chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))
        return str(client.post(target, content=chunks, headers=AUTH).status_code)
    if how == "abandon":
        return abandon(target, body)
    if how == "abandon stream":
        with httpx.Client(timeout=30) as quitter:
            with quitter.stream("POST", target, content=body, headers=AUTH) as response:
                if response.status_code == 200:
                    next(response.iter_lines())  # the first event, then leave mid-answer
                    return "abandoned stream"
                response.read()
                return str(response.status_code)
    return str(client.post(target, content=body, headers=AUTH).status_code)


def abandon(target: str, body: bytes) -> str:
    """A client that sends its whole request, then closes the connection without reading a byte.
    Raw socket, not httpx: a read timeout would race the server, and a fast machine answers first."""
    url = httpx.URL(target)
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        try:
            sock.sendall(head + body)
        except ConnectionError:  # the server may refuse an oversized body before it has all of it
            pass
        time.sleep(0.01)  # a moment in which the server may start on it before the close
    return "abandoned"


class HealthProbe:
    """Asks /health every 50 ms from its own thread and connection; records the slowest answer."""

    def __init__(self, url: str):
        self.url, self.slowest, self.failures, self.probes = url, 0.0, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="health-probe")

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.wait(0.05):
                start = time.perf_counter()
                try:
                    status = client.get(f"{self.url}/health").status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.probes += 1
                self.slowest = max(self.slowest, time.perf_counter() - start)
                if status != 200:
                    self.failures.append(status)


def test_fuzz_gives_no_5xx_keeps_health_fast_and_the_server_up(server):
    rng = random.Random(SEED)
    counts: Counter[str] = Counter()
    by_class: Counter[tuple[str, str]] = Counter()
    started = time.perf_counter()
    with HealthProbe(server) as health, httpx.Client(timeout=30) as client:
        for _ in range(ROUNDS):
            name = rng.choice(list(MAKERS))
            body = MAKERS[name](rng)
            body = encode(body) if isinstance(body, dict) else body
            for result in send(client, server, body, rng.choice(SENDS)):
                counts[result] += 1
                by_class[(name, result)] += 1
    seconds = time.perf_counter() - started
    summary = (
        f"{sum(counts.values())} requests in {seconds:.1f} s, by status: {dict(sorted(counts.items()))}; "
        f"/health: {health.probes} probes, slowest {health.slowest * 1000:.0f} ms"
    )
    print(f"\n{summary}\nby class: {dict(sorted(by_class.items()))}")
    assert sum(counts.values()) >= 500
    assert not [o for o in counts if o.isdigit() and int(o) >= 500], summary
    assert not [o for o in counts if o.startswith("client error")], summary
    assert health.probes > 0 and not health.failures and health.slowest < 1.0, summary
    for status in ["200", "400", "401", "413", "429", "abandoned", "abandoned stream"]:
        assert counts[status] > 0, f"the fuzz never produced {status}: {summary}"
    # the server is still up and still answers correctly
    reply = httpx.post(
        f"{server}/v1/chat/completions", json=valid(random.Random(1)), headers=AUTH, timeout=30
    )
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
