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
`precision` ("fp32" or "bf16") says how the texts were read: "bf16" on CPUs with native bf16 unless
the server was started with --classify-precision fp32 (tasks/classify/model.Classifier).

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad body,
401 for a missing or wrong key, 404 for an unknown classifier. A chat request whose `model` is a
classifier gets a 400 that says to use /v1/classify: a classifier picks labels, it does not write.

`serve.app.build_app(engine, api_key, classifiers=...)` mounts these routes next to the chat API
(engine None: a server of classifiers only, whose bases may have no chat template), behind the same
guards as chat (serve/guards.py): 413 over the body limit, 429 past the queue, 500 for the unexpected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from ..tasks.classify.model import Classifier, Precision
from .guards import Guards
from .requests import APIError, parse_body

MAX_INPUTS = 256


# --- loading -------------------------------------------------------------------------------------
def load_classifiers(paths: dict[str, str | Path], precision: Precision = "auto") -> dict[str, Classifier]:
    """Each classification adapter on its own base, as it was trained (heads differ in size)."""
    return {name: Classifier.from_adapter(path, precision=precision) for name, path in paths.items()}


# --- routes --------------------------------------------------------------------------------------
def add_classify_routes(app: FastAPI, guards: Guards, classifiers: dict[str, Classifier]) -> None:
    """Mount POST /v1/classify on `app`, through the server's guards (key, admission, body limit, errors)."""

    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        async with guards.admitted(request) as (raw, keep):
            return await guards.in_worker(request, keep, lambda: answer(classifiers, raw))


def answer(classifiers: dict[str, Classifier], raw: bytes) -> dict[str, Any]:
    """Parse, check and answer one request (CPU work: in a worker thread, never on the event loop)."""
    name, texts = parse_classify_request(classifiers, parse_body(raw))
    return classify_response(name, classifiers[name], texts, classifiers[name].predict(texts))


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
        "precision": classifier.precision,  # "bf16": read under bf16 autocast (Classifier's precision)
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
