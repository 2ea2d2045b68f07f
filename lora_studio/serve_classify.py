"""`POST /v1/classify`: classification adapters over HTTP, next to the OpenAI-compatible chat API.

Request (JSON):
    {"model": "tickets", "input": "my parcel never came"}
    {"model": "tickets", "input": ["first text", "second text"]}     # up to 256 texts per request
`model` names a served classifier; it may be left out when the server has exactly one.

Response (200):
    {"object": "list", "model": "tickets", "labels": ["billing", "shipping", ...],
     "data": [{"object": "classification", "index": 0, "input": "my parcel never came",
               "label": "shipping", "probabilities": {"billing": 0.01, "shipping": 0.97, ...}}]}
`labels` is the label order (id i is labels[i]); each row's probabilities cover every label and sum to 1.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad body,
401 for a missing or wrong key, 404 for an unknown classifier. A chat request whose `model` is a
classifier gets a 400 that says to use /v1/classify: a classifier picks labels, it does not write.

`serve.build_app(engine, api_key, classifiers)` mounts these routes next to the chat API; when a
server has classifiers only (their base may have no chat template), `classify_app` is the whole app.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .classifier import Classifier, is_classifier
from .serve_requests import APIError, RequestGuard, api_key_check, parse_body, read_body

MAX_INPUTS = 256
CHAT_PATHS = ("/v1/chat/completions", "/v1/completions")


# --- loading -------------------------------------------------------------------------------------
def split_adapters(names: list[str], paths: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """(chat names, chat paths, {classifier name: path}), told apart by each folder's lora_studio.json."""
    from .adapters import read_metadata

    chat_names, chat_paths, classifiers = [], [], {}
    for name, path in zip(names, paths, strict=True):
        if is_classifier(read_metadata(path)):
            classifiers[name] = path
        else:
            chat_names.append(name)
            chat_paths.append(path)
    return chat_names, chat_paths, classifiers


def load_classifiers(paths: dict[str, str | Path]) -> dict[str, Classifier]:
    """Each classification adapter on its own base, as it was trained (heads differ in size)."""
    return {name: Classifier.from_adapter(path) for name, path in paths.items()}


# --- routes --------------------------------------------------------------------------------------
def add_classify_routes(
    app: FastAPI,
    classifiers: dict[str, Classifier],
    authorize: Callable[[Request], None],
    max_bytes: int = 4 * 2**20,
) -> None:
    """Mount POST /v1/classify on `app`; `authorize` is the app's API key check."""

    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        try:
            authorize(request)
            body = parse_body(await read_body(request, max_bytes))  # 413 past the limit
            name, texts = parse_classify_request(classifiers, body)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        predictions = await run_in_threadpool(classifiers[name].predict, texts)
        return classify_response(name, classifiers[name], texts, predictions)


def refuse_classifier(classifiers: dict[str, Classifier], body: dict[str, Any]) -> None:
    """For chat endpoints: a request whose `model` is a classifier is a 400 that names the right endpoint."""
    model = body.get("model")
    if isinstance(model, str) and model in classifiers:
        raise APIError(
            400,
            f"{model!r} is a classification adapter: it picks one of {len(classifiers[model].labels)} labels "
            f'and cannot chat. POST /v1/classify with {{"model": "{model}", "input": "your text"}} instead',
            param="model",
            code="model_is_classifier",
        )


def parse_classify_request(classifiers: dict[str, Classifier], body: dict[str, Any]) -> tuple[str, list[str]]:
    """Check a classify request: (classifier name, texts)."""
    model = body.get("model")
    if model is None and len(classifiers) == 1:
        model = next(iter(classifiers))
    if not isinstance(model, str) or model not in classifiers:
        served = ", ".join(classifiers) or "none"
        status = 400 if model is None else 404
        raise APIError(
            status,
            f"model: {model!r} is not a classifier served here; served classifiers: {served}",
            param="model",
            code=None if status == 400 else "model_not_found",
        )
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or len(texts) > MAX_INPUTS:
        raise APIError(400, f"input: expected a text or a list of 1 to {MAX_INPUTS} texts", param="input")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise APIError(400, f"input[{i}]: expected a non-empty string, got {text!r:.40}", param="input")
    return model, texts


def classify_response(
    name: str, classifier: Classifier, texts: list[str], predictions: list[Any]
) -> dict[str, Any]:
    return {
        "object": "list",
        "model": name,
        "labels": classifier.labels,
        "data": [
            {
                "object": "classification",
                "index": i,
                "input": text,
                "label": p.label,
                "probabilities": p.probabilities,
            }
            for i, (text, p) in enumerate(zip(texts, predictions, strict=True))
        ],
    }


# --- a server of classifiers only ----------------------------------------------------------------
def classify_app(
    classifiers: dict[str, Classifier], api_key: str | None = None, allowed_hosts: Sequence[str] = ()
) -> FastAPI:
    """The whole app when only classifiers are served: /health, /v1/models, /v1/classify; chat refused."""
    app = FastAPI(title="LoRA Studio classifiers", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, allowed_hosts=tuple(allowed_hosts))  # Host and JSON, as chat does

    authorize = api_key_check(api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        authorize(request)
        cards = [
            {"id": name, "object": "model", "owned_by": "lora-studio", "task": "classify"}
            for name in classifiers
        ]
        return {"object": "list", "data": cards}

    for path in CHAT_PATHS:

        @app.post(path)
        async def chat(request: Request) -> Any:
            authorize(request)
            body = parse_body(await request.body())
            refuse_classifier(classifiers, body)
            raise APIError(400, "this server serves classifiers only: POST /v1/classify", param="model")

    add_classify_routes(app, classifiers, authorize)
    return app


def run_classify_server(
    classifiers: dict[str, Classifier],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    allowed_hosts: Sequence[str] = (),
) -> None:
    import uvicorn

    from .serve import served_hosts

    app = classify_app(classifiers, api_key, served_hosts(host, allowed_hosts))
    uvicorn.run(app, host=host, port=port, log_level="warning")
