"""An OpenAI-compatible HTTP API over the inference engine (FastAPI + uvicorn).

    GET  /v1/models             the base model, every loaded adapter and every classifier
    POST /v1/chat/completions   `model` picks an adapter or the base; `stream: true` for SSE
    POST /v1/classify           `model` picks a classifier (task: classify; see serve/classify.py)
    GET  /health                liveness, no key needed

    app = build_app(engine, api_key="secret", max_body_mb=4, max_queue=16)  # no side effects
    app = build_app(None, classifiers={"tickets": clf})                      # classifiers only
    run_server(engine, host="127.0.0.1", port=8000, api_key=None)

Every route of every task goes through the same guards (`Guards`): the API key, admission (429
past `max_queue`), the body limit (413), parsing off the event loop, cancel-on-disconnect and the
error handlers (never a traceback; 500 in OpenAI's shape for the unexpected).

Works with the official `openai` client (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`).
The base answers to its name and to "base". Supported request fields: model, messages (string
content or text parts), max_tokens / max_completion_tokens, temperature (omitted: 0, greedy and
reproducible), top_p, seed, stream, stream_options.include_usage, n (1 only). A non-empty `stop`
is refused rather than silently ignored.

Every failure is a JSON error in OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for bad requests, 401 for a missing or wrong key, 404 for an unknown model or path, 413 for a
body over `max_body_mb`, 429 (with Retry-After) when `max_queue` requests already wait. The body is
read under its size limit, then parsed, templated and tokenised in a worker thread, so the event
loop (and /health) never waits on a big request. A client that goes away, streaming or not, stops
its generation. Binding beyond loopback without a key is refused (see `access`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio.to_thread

# Imported here, not inside build_app: FastAPI resolves the handlers' annotations (`request: Request`)
# from this module's globals, and would otherwise take `request` for a query parameter.
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..access import require_auth_beyond_loopback
from ..errors import RequestError
from ..inference import Generation, InferenceEngine
from .classify import add_classify_routes, refuse_classifier
from .guards import Admission, Guards, add_error_handlers, until_gone
from .requests import (
    BASE_ALIAS,
    APIError,
    ChatRequest,
    RequestGuard,
    api_key_check,
    engine_error_message,
    max_prompt_chars,
    model_ids,
    parse_body,
    parse_chat_request,
    resolve_model,
)

__all__ = ["API_KEY_ENV", "BASE_ALIAS", "APIError", "build_app", "model_ids", "run_server"]

log = logging.getLogger(__name__)

API_KEY_ENV = "LORA_STUDIO_API_KEY"
DEFAULT_MAX_BODY_MB = 4.0
DEFAULT_MAX_QUEUE = 16


def build_app(
    engine: InferenceEngine | None,
    api_key: str | None = None,
    *,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    max_queue: int = DEFAULT_MAX_QUEUE,
    classifiers: dict | None = None,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app serving `engine` (None: classifiers only) and `classifiers` (name -> Classifier);
    with `api_key`, /v1 routes need `Authorization: Bearer <key>`.

    Every request passes `RequestGuard` first: a Host of this machine or of `allowed_hosts`, and
    JSON bodies only."""
    admission = Admission(max_queue)
    guards = Guards(admission, api_key_check(api_key), int(max_body_mb * 2**20))
    classifiers = classifiers or {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # every admitted request may hold a worker thread while it waits: leave room for them all
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, admission.capacity + 8)
        yield

    app = FastAPI(title="LoRA Studio", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    created = int(time.time())
    add_error_handlers(app)
    app.add_middleware(RequestGuard, allowed_hosts=tuple(allowed_hosts))

    # async handlers run on the event loop, so they never wait for a worker thread
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        guards.authorize(request)
        chat = [model_card(engine, m, created) for m in model_ids(engine)] if engine else []
        return {"object": "list", "data": chat + [classifier_card(n, created) for n in classifiers]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        guards.authorize(request)
        if model_id in classifiers:
            return classifier_card(model_id, created)
        if engine is None:
            raise APIError(
                404, f"model {model_id!r} is not served here", param="model", code="model_not_found"
            )
        resolve_model(engine, model_id)
        return model_card(engine, model_id, created)

    add_chat_routes(app, guards, engine, classifiers)
    add_classify_routes(app, guards, classifiers)
    return app


def add_chat_routes(app: FastAPI, guards: Guards, engine: InferenceEngine | None, classifiers: dict) -> None:
    """POST /v1/chat/completions; on a server of classifiers only, a 400 that names /v1/classify."""
    prompt_chars = max_prompt_chars(engine) if engine is not None else 0

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        async with guards.admitted(request) as (raw, keep):
            chat, reply = await run_in_threadpool(start_chat, engine, raw, prompt_chars, classifiers)
            keep(reply)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return StreamingResponse(
                cancel_on_disconnect(sse_events(reply, completion_id, chat.model, chat.include_usage), reply),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text = await reply_text(request, reply)
        return completion(reply, text, completion_id, chat.model)


def start_chat(
    engine: InferenceEngine | None, raw: bytes, prompt_chars: int, classifiers: dict
) -> tuple[ChatRequest, Generation]:
    """Parse, check, template and tokenise a request, and start its generation (CPU work: call it
    in a worker thread, never on the event loop)."""
    refuse_classifier(classifiers, parse_body(raw))  # a classifier's name: a 400 naming /v1/classify
    if engine is None:
        raise APIError(400, "this server serves classifiers only: POST /v1/classify", param="model")
    chat = parse_chat_request(raw, engine, prompt_chars)
    try:
        return chat, engine.start(chat.messages, chat.adapter, chat.settings)
    except RequestError as e:  # the engine's names, in the API's words
        message, param = engine_error_message(str(e))
        raise APIError(400, message, param=param) from None


def classifier_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lora-studio", "task": "classify"}


def model_card(engine: InferenceEngine, model: str, created: int) -> dict[str, Any]:
    card = {"id": model, "object": "model", "created": created, "owned_by": "lora-studio"}
    adapter = resolve_model(engine, model)
    if adapter is not None:
        card["parent"] = engine.base_name
    return card


# --- responses ---------------------------------------------------------------------------------
def completion(reply: Generation, text: str, completion_id: str, model: str) -> dict[str, Any]:
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
    (Starlette cancels this coroutine), instead of holding the engine until max_tokens.

    The wait for each event is abandoned on cancel: a request still queued for the engine has no
    next event to wait for, and must be cancelled now, not when its generation starts."""
    try:
        while (
            event := await anyio.to_thread.run_sync(next, events, None, abandon_on_cancel=True)
        ) is not None:
            yield event
    finally:
        if not reply.finished:
            log.info("a client left mid-stream: its generation was stopped")
        reply.cancel()


async def reply_text(request: Request, reply: Generation) -> str:
    """Wait for a whole reply in a worker thread; a client that goes away meanwhile stops it."""
    try:
        return await until_gone(request, run_in_threadpool(reply.wait))
    except APIError:
        reply.cancel()
        log.info("a client left before its answer: its generation was stopped")
        raise


def run_server(
    engine: InferenceEngine | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    max_queue: int = DEFAULT_MAX_QUEUE,
    insecure_no_auth: bool = False,
    classifiers: dict | None = None,
    allowed_hosts: Sequence[str] = (),
) -> None:
    """Serve until interrupted; beyond loopback only with an API key, or with `insecure_no_auth`."""
    import uvicorn

    check_exposure(host, api_key, insecure_no_auth)
    app = build_app(
        engine,
        api_key,
        max_body_mb=max_body_mb,
        max_queue=max_queue,
        classifiers=classifiers,
        allowed_hosts=served_hosts(host, allowed_hosts),
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


def served_hosts(host: str, allowed_hosts: Sequence[str]) -> tuple[str, ...]:
    """The Host names the server answers to besides loopback: the bound address (unless a wildcard)
    and the operator's --allowed-host names."""
    return (*allowed_hosts, *((host,) if host not in ("0.0.0.0", "::", "") else ()))


def check_exposure(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """The server's rule: no API key, no address beyond this machine (unless the operator insists)."""
    require_auth_beyond_loopback(
        host,
        has_auth=bool(api_key),
        insecure=insecure_no_auth,
        what="the model API",
        secret="API key",
        how=f"--api-key-file FILE or ${API_KEY_ENV}",
    )
