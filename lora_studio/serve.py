"""An OpenAI-compatible HTTP API over the inference engine (FastAPI + uvicorn).

    GET  /v1/models             the base model and every loaded adapter
    POST /v1/chat/completions   `model` picks an adapter or the base; `stream: true` for SSE
    GET  /health                liveness, no key needed

    app = build_app(engine, api_key="secret", max_body_mb=4, max_queue=16)  # no side effects
    run_server(engine, host="127.0.0.1", port=8000, api_key=None)

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

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import anyio.to_thread

# Imported here, not inside build_app: FastAPI resolves the handlers' annotations (`request: Request`)
# from this module's globals, and would otherwise take `request` for a query parameter.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .access import require_auth_beyond_loopback
from .errors import RequestError
from .inference import Generation, InferenceEngine
from .serve_requests import (
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
    read_body,
    resolve_model,
)

__all__ = ["API_KEY_ENV", "BASE_ALIAS", "APIError", "build_app", "model_ids", "run_server"]

log = logging.getLogger(__name__)

API_KEY_ENV = "LORA_STUDIO_API_KEY"
DEFAULT_MAX_BODY_MB = 4.0
DEFAULT_MAX_QUEUE = 16
RETRY_AFTER_S = 1


class Admission:
    """Bounds the chat requests the server holds: one generating and up to `max_queue` waiting.

    A request holds its place from admission until its generation has ended, not merely until
    its response was sent: a cancelled generation still holds the engine until its next token.
    Used on the event loop only, so it needs no lock.
    """

    def __init__(self, max_queue: int):
        self.capacity = max_queue + 1
        self._preparing = 0  # admitted, body being read or tokenised
        self._replies: list[Generation] = []  # admitted and started, maybe finished by now

    def held(self) -> int:
        self._replies = [r for r in self._replies if not r.finished]
        return self._preparing + len(self._replies)

    @contextlib.contextmanager
    def place(self) -> Iterator[Callable[[Generation], None]]:
        """A place in the queue while the request is prepared; call the yielded function with its reply."""
        if self.held() >= self.capacity:
            raise APIError(
                429,
                f"the server is busy: {self.capacity - 1} requests are already waiting; retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._preparing += 1
        try:
            yield self._keep
        finally:
            self._preparing -= 1

    def _keep(self, reply: Generation) -> None:
        self._replies.append(reply)  # not a bound `append`: held() replaces the list


def build_app(
    engine: InferenceEngine,
    api_key: str | None = None,
    *,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    max_queue: int = DEFAULT_MAX_QUEUE,
    classifiers: dict | None = None,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app serving `engine`; with `api_key`, /v1 routes need `Authorization: Bearer <key>`.

    Every request passes `RequestGuard` first: a Host of this machine or of `allowed_hosts`, and
    JSON bodies only."""
    admission = Admission(max_queue)
    max_bytes = int(max_body_mb * 2**20)
    prompt_chars = max_prompt_chars(engine)

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

    authorize = api_key_check(api_key)

    # async handlers run on the event loop, so they never wait for a worker thread
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card(engine, m, created) for m in model_ids(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        resolve_model(engine, model_id)
        return model_card(engine, model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        with admission.place() as keep:
            raw = await read_body(request, max_bytes)
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

    if classifiers:  # POST /v1/classify for task: classify adapters
        from .serve_classify import add_classify_routes

        add_classify_routes(app, classifiers, authorize, max_bytes)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error, expected or not, answered in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

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


def start_chat(
    engine: InferenceEngine, raw: bytes, prompt_chars: int, classifiers: dict | None = None
) -> tuple[ChatRequest, Generation]:
    """Parse, check, template and tokenise a request, and start its generation (CPU work: call it
    in a worker thread, never on the event loop)."""
    if classifiers:  # a classifier's name gets a 400 naming /v1/classify, not "unknown model"
        from .serve_classify import refuse_classifier

        refuse_classifier(classifiers, parse_body(raw))
    chat = parse_chat_request(raw, engine, prompt_chars)
    try:
        return chat, engine.start(chat.messages, chat.adapter, chat.settings)
    except RequestError as e:  # the engine's names, in the API's words
        message, param = engine_error_message(str(e))
        raise APIError(400, message, param=param) from None


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
    waiting = asyncio.ensure_future(run_in_threadpool(reply.wait))
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiting.done():  # the client left (or the server is stopping): no one will read it
            reply.cancel()
            log.info("a client left before its answer: its generation was stopped")
    if not waiting.done():
        raise APIError(400, "the client went away before the answer was ready")
    return waiting.result()


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def run_server(
    engine: InferenceEngine,
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
