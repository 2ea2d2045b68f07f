"""Every route of every task goes through the same guards, on the mixed server and on a server of
classifiers only: the API key, the body limit (413, chunked too), admission (429 with Retry-After),
work off the event loop (/health stays fast), a 500 in OpenAI's shape for the unexpected, and a
seeded fuzz of /v1/classify with no answer >= 500. The routes are enumerated from the app itself,
so a new door cannot forget a guard. A real uvicorn server on 127.0.0.1 with the tiny model."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from classify_helpers import build_classifier_adapter
from serve_helpers import health_while, running_server

from lora_studio.inference import InferenceEngine
from lora_studio.serve.app import build_app
from lora_studio.tasks.classify.model import Classifier

KEY = "doors-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
BODIES = {
    "/v1/chat/completions": {
        "model": "base",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    },
    "/v1/classify": {"model": "toy", "input": "Paris capital"},
}


@pytest.fixture(scope="module")
def classifier(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    folder = build_classifier_adapter(
        tiny_model_dir, tmp_path_factory.mktemp("clf"), ["greet", "city", "fox"]
    )
    return Classifier.from_adapter(folder)


@pytest.fixture(scope="module", params=["mixed", "classifiers only"])
def app(request, tiny_model_dir: Path, classifier: Classifier):
    engine = InferenceEngine(str(tiny_model_dir)) if request.param == "mixed" else None
    return build_app(engine, KEY, max_body_mb=1, max_queue=1, classifiers={"toy": classifier})


@pytest.fixture(scope="module")
def server(app) -> Iterator[str]:
    with running_server(app) as url:
        yield url


def post_routes(app) -> list[str]:
    return sorted(r.path for r in app.routes if "POST" in getattr(r, "methods", ()))


def test_the_app_lists_every_post_route_this_test_knows(app):
    assert post_routes(app) == sorted(BODIES)  # a new route: add it to BODIES, and every test runs on it


def test_every_route_needs_the_key(app, server):
    for path in post_routes(app):
        response = httpx.post(f"{server}{path}", json=BODIES[path], timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", path


@pytest.mark.parametrize("chunked", [False, True])
def test_every_route_refuses_a_body_over_the_limit(app, server, chunked: bool):
    for path in post_routes(app):
        body = json.dumps({**BODIES[path], "input": "word " * 300_000}).encode()  # 1.5 MB
        content = (body[i : i + 65536] for i in range(0, len(body), 65536)) if chunked else body
        response = httpx.post(f"{server}{path}", content=content, headers=AUTH, timeout=60)
        assert response.status_code == 413, (path, response.text[:200])
        assert response.json()["error"]["code"] == "request_too_large"


def test_every_route_answers_429_with_retry_after_past_the_queue(app, server, classifier, monkeypatch):
    """The classifier is held busy (its real predict waits on an event): the first request works,
    one waits (max_queue=1), the rest get 429 at once on every route."""
    release = threading.Event()
    predict = classifier.predict
    monkeypatch.setattr(classifier, "predict", lambda *a, **k: release.wait(30) and predict(*a, **k))
    held = [
        threading.Thread(
            target=httpx.post,
            args=(f"{server}/v1/classify",),
            kwargs={"json": BODIES["/v1/classify"], "headers": AUTH, "timeout": 60},
        )
        for _ in range(2)
    ]
    for thread in held:
        thread.start()
    try:
        time.sleep(1.0)  # both admitted: one at work, one waiting
        for path in post_routes(app):
            response = httpx.post(f"{server}{path}", json=BODIES[path], headers=AUTH, timeout=30)
            assert response.status_code == 429 and response.headers["Retry-After"] == "1", path
    finally:
        release.set()
        for thread in held:
            thread.join(timeout=60)
    ok = httpx.post(f"{server}/v1/classify", json=BODIES["/v1/classify"], headers=AUTH, timeout=60)
    assert ok.status_code == 200 and ok.json()["data"][0]["label"] in classifier.labels


def test_an_unexpected_error_is_a_500_in_openai_shape(server, classifier, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(classifier, "predict", broken)
    response = httpx.post(f"{server}/v1/classify", json=BODIES["/v1/classify"], headers=AUTH, timeout=30)
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal error: RuntimeError",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_health_stays_fast_while_a_big_classify_body_is_refused(tiny_model_dir, classifier):
    with running_server(build_app(None, max_body_mb=16, classifiers={"toy": classifier})) as url:
        texts = ["word " * 200] * 10_000  # 10 MB of texts: parsed in a worker thread, then refused
        body = {"model": "toy", "input": texts}
        slowest, reply = health_while(url, lambda: httpx.post(f"{url}/v1/classify", json=body, timeout=120))
    assert slowest < 1.0, f"/health took {slowest:.2f} s"
    assert reply.status_code == 400 and "input" in reply.json()["error"]["message"]


# --- a seeded fuzz of /v1/classify --------------------------------------------------------------------
def classify_body(rng: random.Random) -> bytes:
    body: dict = {"model": rng.choice(["toy", "toy", None, "nope", 5]), "input": "Paris capital"}
    kind = rng.choice(["valid", "list", "junk", "nesting", "surrogate", "mangled", "huge int", "many"])
    if kind == "list":
        body["input"] = [f"text {i}" for i in range(rng.randint(1, 20))]
    elif kind == "junk":
        body["input"] = rng.choice([None, "", " ", [], {}, [1, 2], [""], 5, True, "x" * 5000])
    elif kind == "many":
        body["input"] = ["a"] * rng.choice([256, 257, 5000])
    raw = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    if kind == "nesting":
        depth = rng.choice([100, 5000, 100_000])
        raw = raw[:-1] + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "surrogate":
        raw = raw.replace(b"Paris", b"Pa\\ud800ris")
    elif kind == "huge int":
        raw = raw[:-1] + b', "n": ' + b"9" * rng.choice([30, 5000]) + b"}"
    elif kind == "mangled":
        data = bytearray(raw)
        cut = rng.randrange(len(data))
        data[cut : cut + 1] = bytes([rng.randrange(256)])
        raw = bytes(data)
    return raw


def test_fuzz_of_v1_classify_gives_no_5xx(server):
    rng = random.Random(16)
    counts: Counter[str] = Counter()
    with httpx.Client(timeout=60) as client:
        for _ in range(150):
            status = client.post(
                f"{server}/v1/classify", content=classify_body(rng), headers=AUTH
            ).status_code
            counts[str(status)] += 1
    assert not [s for s in counts if int(s) >= 500], counts
    assert counts["200"] > 0 and counts["400"] > 0 and counts["404"] > 0, counts
