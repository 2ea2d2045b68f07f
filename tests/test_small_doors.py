"""Small doors: Host and Content-Type on every server route (chat and classifiers-only servers),
control characters in names, and formulas in the CSV that `classify --out` writes."""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from classify_helpers import build_classifier_adapter
from serve_helpers import running_server
from starlette.routing import Route

from lora_studio import runs
from lora_studio.cli import main
from lora_studio.config import Recipe
from lora_studio.errors import ConfigError
from lora_studio.jobs import JobStore

ESC_NAME = "evil\x1b[2J\x1b]0;pwned\x07name"


@pytest.fixture(scope="module")
def classifiers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lora_studio.tasks.classify.model import Classifier

    folder = build_classifier_adapter(tiny_model_dir, tmp_path_factory.mktemp("c") / "cls", ["a", "b"])
    return {"cls": Classifier.from_adapter(folder)}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:  # module scope for the servers
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-doors"))


def _apps(tiny_model_dir: Path, classifiers: dict) -> dict:
    from lora_studio.inference import InferenceEngine
    from lora_studio.serve.app import build_app

    engine = InferenceEngine(str(tiny_model_dir))
    return {
        "chat + classify": build_app(engine, classifiers=classifiers, allowed_hosts=("studio.lan",)),
        "classifiers only": build_app(None, classifiers=classifiers, allowed_hosts=("studio.lan",)),
    }


def _routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves: a new route is tested without being named."""
    found = []
    for route in app.routes:
        if isinstance(route, Route) and route.path not in ("/openapi.json",):
            path = route.path.replace("{model_id:path}", "cls")
            found += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return found


def test_every_route_refuses_a_foreign_host_and_bodies_that_are_not_json(tiny_model_dir, classifiers) -> None:
    body = json.dumps({"model": "cls", "input": ["hello"]}).encode()
    for name, app in _apps(tiny_model_dir, classifiers).items():
        routes = _routes(app)
        assert ("POST", "/v1/classify") in routes and ("GET", "/health") in routes, name
        with running_server(app) as url, httpx.Client(timeout=30) as client:
            for method, path in routes:
                where = f"{name}: {method} {path}"
                json_type = {"Content-Type": "application/json"}
                for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", ""):
                    response = client.request(
                        method, url + path, content=body, headers={**json_type, "Host": host}
                    )
                    assert response.status_code == 400, (where, host, response.text)
                    assert response.json()["error"]["code"] == "invalid_host", where
                if method == "POST":
                    for kind in (
                        "text/plain",
                        "application/x-www-form-urlencoded",
                        "multipart/form-data",
                        None,
                    ):
                        headers = {"Content-Type": kind} if kind else {}
                        response = client.request(method, url + path, content=body, headers=headers)
                        assert response.status_code == 415, (where, kind, response.text)
                        assert response.json()["error"]["code"] == "unsupported_media_type", where
            # The controls: loopback names, an allowed host and JSON pass.
            port = url.rsplit(":", 1)[1]
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"studio.lan:{port}"):
                assert client.get(f"{url}/health", headers={"Host": host}).status_code == 200, (name, host)
            ok = client.post(
                f"{url}/v1/classify",
                content=body,
                headers={"Content-Type": "application/json; charset=utf-8"},
            )
            assert ok.status_code == 200, (name, ok.text)


def test_names_with_control_characters_are_refused_and_escaped_when_listed(
    tiny_model_dir, chat_file, studio_home, capsys
) -> None:
    from test_jobs import make_recipe

    with pytest.raises(ConfigError, match="name: control characters are not allowed"):
        Recipe.from_dict(make_recipe(tiny_model_dir, chat_file, name=ESC_NAME))
    # Written before this rule (or by hand): listing shows them escaped.
    store = JobStore()
    job_id = store.submit(make_recipe(tiny_model_dir, chat_file, name="plain"))
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET name = ? WHERE id = ?", (ESC_NAME, job_id))
    run_dir = studio_home / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / runs.STATUS_FILE).write_text(json.dumps({"state": "failed", "id": "abc123", "name": ESC_NAME}))
    runs.register(run_dir, "abc123", ESC_NAME, "base\x1b[31m", "chat", time.time())
    for argv in (["jobs", "list"], ["jobs", "show", job_id], ["runs", "list"], ["runs", "show", "abc123"]):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out, (argv, out)
        assert "evil\\x1b[2J" in out, (argv, out)


def test_classify_out_csv_neutralises_formulas(tiny_model_dir, classifiers, tmp_path) -> None:
    rows = [
        {"text": '=HYPERLINK("http://evil.example","click")', "label": "a", "note": "+1"},
        {"text": "-2+3", "label": "b", "note": "@SUM(A1)"},
        {"text": "plain text", "label": "a", "note": "ok"},
    ]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.csv"
    from lora_studio.tasks.classify.files import classify_file

    classify_file(classifiers["cls"], data, out)
    cells = [cell for row in csv.reader(out.open()) for cell in row]
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells), cells
    assert '\'=HYPERLINK("http://evil.example","click")' in cells and "plain text" in cells
