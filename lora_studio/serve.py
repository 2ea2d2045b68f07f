"""An OpenAI-compatible HTTP API over the inference engine (FastAPI + uvicorn).

    GET  /v1/models             the base model and every loaded adapter
    POST /v1/chat/completions   `model` picks an adapter or the base; `stream: true` for SSE
    GET  /health                liveness, no key needed

    app = build_app(engine, api_key="secret")   # a FastAPI app, no side effects beyond the engine
    run_server(engine, host="127.0.0.1", port=8000, api_key=None)

Works with the official `openai` client (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`).
The base answers to its name and to "base". Supported request fields: model, messages (string
content or text parts), max_tokens / max_completion_tokens, temperature (omitted: 0, greedy and
reproducible), top_p, seed, stream, stream_options.include_usage, n (1 only). A non-empty `stop`
is refused rather than silently ignored.

Every failure is a JSON error in OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for bad requests, 401 for a missing or wrong key, 404 for an unknown model or path. The body is
parsed and checked before any generation starts, so a bad request never hangs.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

# Imported here, not inside build_app: FastAPI resolves the handlers' annotations (`request: Request`)
# from this module's globals, and would otherwise take `request` for a query parameter.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from .errors import RequestError
from .inference import DEFAULT_MAX_NEW_TOKENS, Generation, InferenceEngine

log = logging.getLogger(__name__)

API_KEY_ENV = "LORA_STUDIO_API_KEY"
BASE_ALIAS = "base"


class APIError(Exception):
    """An error answered to the client in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def build_app(
    engine: InferenceEngine, api_key: str | None = None, classifiers: dict | None = None
) -> FastAPI:
    """The FastAPI app serving `engine`; with `api_key`, /v1 routes need `Authorization: Bearer <key>`."""
    from .serve_classify import add_classify_routes, refuse_classifier  # POST /v1/classify (task: classify)

    app = FastAPI(title="LoRA Studio", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(
            APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        body = APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card(engine, m, created) for m in model_ids(engine)]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        resolve_model(engine, model_id)
        return model_card(engine, model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        body = parse_body(await request.body())
        refuse_classifier(classifiers or {}, body)
        model, adapter, kwargs, stream, include_usage = parse_chat_request(engine, body)
        try:
            reply = engine.start(kwargs.pop("messages"), adapter, **kwargs)
        except RequestError as e:  # the engine's names, in the API's words
            message = str(e).replace("max_new_tokens", "max_tokens")
            raise APIError(400, message, param=_param_of(message)) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if stream:
            return StreamingResponse(
                cancel_on_disconnect(sse_events(reply, completion_id, model, include_usage), reply),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text = await run_in_threadpool(reply.wait)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": usage(reply),
        }

    add_classify_routes(app, classifiers or {}, authorize)
    return app


# --- request parsing ---------------------------------------------------------------------------
def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_chat_request(
    engine: InferenceEngine, body: dict[str, Any]
) -> tuple[str, str | None, dict, bool, bool]:
    """Check a chat request: (model id, adapter or None for the base, engine kwargs, stream, usage)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(
            400, "model: required, the id of the base or an adapter (see GET /v1/models)", param="model"
        )
    adapter = resolve_model(engine, model)
    if "messages" not in body:
        raise APIError(400, "messages: required, a list of {'role', 'content'} objects", param="messages")
    if body.get("n") not in (None, 1):
        raise APIError(400, f"n: only 1 choice per request is supported, got {body.get('n')!r}", param="n")
    if body.get("stop") not in (None, [], ""):
        raise APIError(
            400,
            "stop: stop sequences are not supported; the reply ends at the model's end-of-turn",
            param="stop",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream: expected true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    kwargs = {
        "messages": _text_messages(body["messages"]),
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS if max_tokens is None else max_tokens,
        "temperature": 0.0 if body.get("temperature") is None else body["temperature"],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "seed": body.get("seed"),
    }
    return model, adapter, kwargs, stream, bool(isinstance(options, dict) and options.get("include_usage"))


def _text_messages(messages: Any) -> Any:
    """OpenAI allows content as a list of parts; text parts are joined, anything else is refused."""
    if not isinstance(messages, list):
        return messages  # the engine names the problem
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in parts
            ):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            m = {**m, "content": "".join(p["text"] for p in parts)}
        out.append(m)
    return out


def _param_of(message: str) -> str | None:
    name = message.split(":", 1)[0].split("[", 1)[0]
    return name if name in ("messages", "max_tokens", "temperature", "top_p", "seed") else None


def model_ids(engine: InferenceEngine) -> list[str]:
    return [engine.base_name, *engine.adapter_names()]


def resolve_model(engine: InferenceEngine, model: str) -> str | None:
    """The adapter a model id names, None for the base; unknown ids are a 404."""
    if model in (engine.base_name, BASE_ALIAS):
        return None
    if model in engine.adapter_names():
        return model
    raise APIError(
        404,
        f"the model {model!r} does not exist here; available: {', '.join(model_ids(engine))}",
        param="model",
        code="model_not_found",
    )


def model_card(engine: InferenceEngine, model: str, created: int) -> dict[str, Any]:
    card = {"id": model, "object": "model", "created": created, "owned_by": "lora-studio"}
    adapter = resolve_model(engine, model)
    if adapter is not None:
        card["parent"] = engine.base_name
    return card


# --- responses ---------------------------------------------------------------------------------
def usage(reply: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def sse_events(reply: Generation, completion_id: str, model: str, include_usage: bool) -> Iterator[str]:
    """The reply as OpenAI's `chat.completion.chunk` server-sent events, ending with [DONE]."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return f"data: {json.dumps(data)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        for piece in reply:
            yield chunk({"content": piece})
        yield chunk({}, reply.finish_reason)
        if include_usage:
            data = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage(reply),
            }
            yield f"data: {json.dumps(data)}\n\n"
    except Exception as e:  # headers are already sent: report in-stream, then end cleanly
        log.exception("generation failed mid-stream")
        yield f"data: {json.dumps(APIError(500, f'generation failed: {e}', type='server_error').body())}\n\n"
    finally:
        reply.cancel()  # a client that went away stops the generation
    yield "data: [DONE]\n\n"


async def cancel_on_disconnect(events: Iterator[str], reply: Generation) -> AsyncIterator[str]:
    """Stream the events from a worker thread; a client that goes away stops the generation at once
    (Starlette cancels this coroutine), instead of holding the engine until max_tokens."""
    try:
        async for event in iterate_in_threadpool(events):
            yield event
    finally:
        if not reply.finished:
            log.info("a client left mid-stream: its generation was stopped")
        reply.cancel()


def run_server(
    engine: InferenceEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    classifiers: dict | None = None,
) -> None:
    """Serve until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use it", host)
    uvicorn.run(build_app(engine, api_key, classifiers), host=host, port=port, log_level="warning")
