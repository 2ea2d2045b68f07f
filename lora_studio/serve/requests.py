"""Reading and checking chat requests for the HTTP API: bounded, strict, and never a 500.

    raw = await read_body(request, max_bytes)      # 413 past the limit, counted as the bytes arrive
    chat = parse_chat_request(raw, engine, limit)   # a ChatRequest, or an APIError (400/404)

`parse_chat_request` costs CPU (JSON parsing of up to `max_bytes`), so the server calls it in a
worker thread, never on the event loop. What it refuses, each with a 400 in OpenAI's error shape:
bodies that are not a JSON object, integers of more than 20 digits, NaN/Infinity, nesting deeper
than 32 levels, lone UTF-16 surrogates in any string, booleans where numbers belong, and prompts
with more characters than could ever fit the model's context (refused before tokenising, which
would otherwise cost seconds of CPU per megabyte). Value ranges (max_tokens, temperature, top_p,
seed) are checked by the engine's `GenerationSettings`; the server maps its names to the API's.
"""

from __future__ import annotations

import hmac
import json
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..access import is_loopback
from ..generation import DEFAULT_MAX_NEW_TOKENS, GenerationSettings
from ..inference import InferenceEngine

BASE_ALIAS = "base"
MAX_JSON_DEPTH = 32  # a chat request is about 5 deep; anything far deeper is an attack or a bug
MAX_INT_DIGITS = 20  # int64 has 19 digits; longer integers cannot be a valid value anywhere
SURROGATE = re.compile("[\ud800-\udfff]")
_short = reprlib.Repr()  # keyword arguments need Python 3.12
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 2, 40, 40, 4, 4


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
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def show(value: Any) -> str:
    """A short repr of a client's value for an error message (never megabytes, never deep recursion)."""
    return _short.repr(value)


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat request: what to generate, with which model, and how to answer."""

    model: str  # the id the client asked for, echoed in the answer
    adapter: str | None  # None: the base model
    messages: list[dict[str, Any]]
    settings: GenerationSettings  # unchecked: the engine checks the ranges when it starts
    stream: bool
    include_usage: bool


# --- the guard every request passes ------------------------------------------------------------
BODY_METHODS = ("POST", "PUT", "PATCH")


class RequestGuard:
    """ASGI middleware: before any route, refuse a `Host` that is not this machine or an allowed
    host (400: DNS rebinding would let a web page read the answers), and a body that is not JSON
    (415: a web page can send text/plain or a form to any server without asking first).

    `allowed_hosts`: names or addresses clients may use besides loopback (the operator's
    --allowed-host; "*" allows any). Every app (chat, classify, classifiers only) installs it.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] = ()):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed = {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = host_name(headers.get("host", ""))
        if not (self.any_host or host in self.allowed or is_loopback(host)):
            return APIError(
                400,
                f"the Host header {show(headers.get('host', ''))} is not this server's; the operator can "
                "allow a name clients use with --allowed-host",
                code="invalid_host",
            )
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if scope["method"] in BODY_METHODS and media != "application/json":
            return APIError(
                415,
                f"expected a JSON body sent with 'Content-Type: application/json', got {show(media or None)}",
                code="unsupported_media_type",
            )
        return None


def host_name(header: str) -> str:
    """The name or address of a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


# --- the body ----------------------------------------------------------------------------------
def api_key_check(api_key: str | None) -> Callable[[Request], None]:
    """The check every /v1 route makes: `Authorization: Bearer <api_key>` (nothing when no key is set)."""

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

    return authorize


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `max_bytes` (declared or sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # chunked bodies are counted as they arrive
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client went away before sending the whole body") from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {max_bytes / 2**20:g} MB; "
        "send a shorter chat (the operator sets the limit with --max-body-mb)",
        code="request_too_large",
    )


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; anything else (or anything that could hurt later) is a 400."""
    try:
        body = json.loads(raw or b"", parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    _check_values(body)
    return body


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise APIError(
            400,
            f"the request body holds an integer of {digits} digits; numbers here have at most {MAX_INT_DIGITS}",
        )
    return int(text)


def _no_constant(name: str) -> Any:
    raise APIError(400, f"the request body holds {name}, which is not a JSON number")


def _too_deep() -> APIError:
    return APIError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep; flatten it")


def _check_values(body: dict[str, Any]) -> None:
    """Refuse deep nesting and lone surrogates anywhere (a tokenizer cannot encode them), naming where."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            for key, item in value.items():  # the key is pushed last so it is checked first:
                stack.append((item, f"{path}.{key}" if path else str(key), depth + 1))
                stack.append((key, path or "the request body", depth + 1))  # the path names it
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and SURROGATE.search(value):
            raise APIError(
                400,
                f"{path}: holds a lone UTF-16 surrogate, which is not text; send valid Unicode",
                param=path.split(".")[0].split("[")[0] or None,
            )


# --- the chat request --------------------------------------------------------------------------
def parse_chat_request(raw: bytes, engine: InferenceEngine, max_prompt_chars: int) -> ChatRequest:
    """Check a chat request's body; value ranges are left to the engine's `GenerationSettings`."""
    body = parse_body(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(
            400, "model: required, the id of the base or an adapter (see GET /v1/models)", param="model"
        )
    adapter = resolve_model(engine, model)
    if "messages" not in body:
        raise APIError(400, "messages: required, a list of {'role', 'content'} objects", param="messages")
    n = _field(body, "n")
    if n not in (None, 1):
        raise APIError(400, f"n: only 1 choice per request is supported, got {n}", param="n")
    if body.get("stop") not in (None, [], ""):
        raise APIError(
            400,
            "stop: stop sequences are not supported; the reply ends at the model's end-of-turn",
            param="stop",
        )
    options = _field(body, "stream_options") or {}
    if not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options.include_usage: expected true or false", param="stream_options")
    messages = _text_messages(body["messages"])
    _check_prompt_size(messages, max_prompt_chars)
    max_tokens = _field(body, "max_completion_tokens")
    max_tokens = _field(body, "max_tokens") if max_tokens is None else max_tokens
    settings = GenerationSettings(  # the engine checks the ranges
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_tokens is None else max_tokens,
        temperature=_field(body, "temperature", 0.0),
        top_p=_field(body, "top_p", 1.0),
        seed=_field(body, "seed"),
    )
    stream = _field(body, "stream", False)  # null means false, as in OpenAI's API
    return ChatRequest(model, adapter, messages, settings, stream, bool(options.get("include_usage")))


# The JSON type of each optional field, and how an error names it. A boolean is never a number.
FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "n": (int, "an integer"),
    "max_tokens": (int, "a positive integer"),
    "max_completion_tokens": (int, "a positive integer"),
    "temperature": ((int, float), "a number from 0 to 2"),
    "top_p": ((int, float), "a number in (0, 1]"),
    "seed": (int, "a 64-bit integer"),
    "stream": (bool, "true or false"),
    "stream_options": (dict, "an object"),
}


def _field(body: dict[str, Any], name: str, default: Any = None) -> Any:
    """body[name] if it has its JSON type, `default` when it is absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kind, expected = FIELDS[name]
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise APIError(400, f"{name}: expected {expected}, got {show(value)}", param=name)


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


def _check_prompt_size(messages: Any, max_chars: int) -> None:
    if not isinstance(messages, list):
        return
    size = sum(
        len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)
    )
    if size > max_chars:
        raise APIError(
            400,
            f"messages: the chat is {size} characters, more than can fit in the model's context "
            f"(at most {max_chars}); shorten the chat",
            param="messages",
        )


def max_prompt_chars(engine: InferenceEngine) -> int:
    """More characters than this can never fit the model's context: context length x the longest
    token's text (a vocabulary string is never shorter than the text it stands for)."""
    longest = max((len(token) for token in engine.tokenizer.get_vocab()), default=1)
    return (engine.context_length or 2**20) * longest


def engine_error_message(message: str) -> tuple[str, str | None]:
    """The engine's RequestError in the API's words, and the request field it names."""
    message = message.replace("max_new_tokens", "max_tokens")
    if len(message) > 400:  # it may quote a client's value: never echo megabytes
        message = message[:400] + "..."
    name = message.split(":", 1)[0].split("[", 1)[0]
    return message, name if name in ("messages", "max_tokens", "temperature", "top_p", "seed") else None


# --- models ------------------------------------------------------------------------------------
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
        f"the model {show(model)} does not exist here; available: {', '.join(model_ids(engine))}",
        param="model",
        code="model_not_found",
    )
