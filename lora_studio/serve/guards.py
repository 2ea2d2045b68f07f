"""The guards every route of every task goes through: one place for each concern.

- the API key (`requests.api_key_check`),
- admission: one request at work and up to `max_queue` waiting, else 429 with Retry-After,
- the body limit (413), read without holding the event loop,
- work in a worker thread, holding its place until it ends; a client that goes away gets no answer,
- error handlers: every error in OpenAI's shape, a 500 (never a traceback) for the unexpected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .requests import APIError, read_body

log = logging.getLogger(__name__)

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
        self._replies: list[Any] = []  # Generation or Held  # admitted and started, maybe finished by now

    def held(self) -> int:
        self._replies = [r for r in self._replies if not r.finished]
        return self._preparing + len(self._replies)

    @contextlib.contextmanager
    def place(self) -> Iterator[Callable[[Any], None]]:
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

    def _keep(self, reply: Any) -> None:
        self._replies.append(reply)  # not a bound `append`: held() replaces the list


class Held:
    """Work in a worker thread that holds its admission place until it ends, even if its client left."""

    finished = False


@dataclass(frozen=True)
class Guards:
    """What every route of every task goes through: one place for each concern."""

    admission: Admission
    authorize: Callable[[Request], None]
    max_bytes: int

    @contextlib.asynccontextmanager
    async def admitted(self, request: Request) -> AsyncIterator[tuple[bytes, Callable[[Any], None]]]:
        """Authorised, admitted (or 429) and the body read under its limit (or 413): (body, keep)."""
        self.authorize(request)
        with self.admission.place() as keep:
            yield await read_body(request, self.max_bytes), keep

    async def in_worker(self, request: Request, keep: Callable[[Any], None], work: Callable[[], Any]) -> Any:
        """`work()` in a worker thread, holding the admission place until it ends; a client that
        goes away meanwhile gets no answer (and the server no longer waits for it)."""
        held = Held()
        keep(held)

        def run() -> Any:
            try:
                return work()
            finally:
                held.finished = True

        return await until_gone(request, run_in_threadpool(run))


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


async def until_gone(request: Request, work: Awaitable[Any]) -> Any:
    """The result of `work`, or a 400 as soon as the client goes away (or the server stops)."""
    waiting = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not waiting.done():  # no one will read it
        raise APIError(400, "the client went away before the answer was ready")
    return waiting.result()


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)
