"""The edge check of what clients send to the FastAPI routes: text that PostgreSQL cannot store and JSON nested
too deeply are refused with a 400 naming the field, before any route, model or query sees them. One check for
every route, so a new route cannot forget it. (The gateway's POSTs never come here: routes/gateway._parse
checks their bodies, and forwards them to engines, not to the database.)

- The path and every query parameter: a NUL character (`%00`) -> 400 naming the parameter.
- A JSON body (POST, PUT, PATCH, DELETE with a JSON or no content type, as FastAPI reads it): read whole, at
  most MAX_BODY_BYTES (else 413), and parsed here once. A NUL or an unpaired surrogate (`"\\ud800"`, which no
  UTF-8 text holds) in any key or string, or nesting deeper than MAX_DEPTH -> 400 naming the field (as
  `models.0`, like validation errors). Otherwise the body is handed on unchanged (FastAPI parses it again;
  these bodies are small). A body that is not JSON at all is left to FastAPI's own 400.
- A WebSocket handshake with such a path or query is accepted and closed with 4400 and the reason (the logs
  route's convention: a close before accepting reaches browsers as a bare 403).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmstack.api.errors import ApiError, error_response

MAX_BODY_BYTES = 1024 * 1024  # the API's own bodies (login, keys) are a few hundred bytes
MAX_DEPTH = 32
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BadInput(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


def text_problem(text: str) -> str | None:
    """Why PostgreSQL could not store `text` (None: it can)."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which is not allowed"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (not valid Unicode text)"
    return None


def check_json(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """BadInput for the first bad key or string, or for nesting deeper than `max_depth` (iterative: a deep
    document cannot exhaust the stack here)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                raise BadInput(path, problem)
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise BadInput(path, f"nested deeper than {max_depth} levels")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                where = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and (problem := text_problem(key)) is not None:
                    raise BadInput(where, f"the key {problem}")
                stack.append((child, where, depth + 1))


def _check_url(scope: Scope) -> None:
    if "\x00" in scope["path"]:
        raise BadInput("", "the path contains a NUL character (%00), which is not allowed")
    query: bytes = scope.get("query_string", b"")
    if not query:
        return
    # As Starlette reads it (latin-1, then percent-decoding as UTF-8).
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        for text in (name, value):
            problem = text_problem(text)
            if problem is not None:
                raise BadInput(name if text_problem(name) is None else "", f"the query parameter {problem}")


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind = bytes(value).split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return True  # FastAPI reads a body without a content type as JSON


async def read_body(receive: Receive, *, limit: int, too_large: str) -> bytes | None:
    """The whole request body (None when the client went away first); 413 with `too_large` beyond `limit`
    bytes. The gateway's bodies and the API's own are read here."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large, code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_body(body: bytes) -> None:
    if not body:
        return
    try:
        document = json.loads(body)
    except ValueError:
        return  # not JSON: FastAPI answers that itself
    except RecursionError:
        raise BadInput("", f"the JSON body is nested deeper than {MAX_DEPTH} levels") from None
    check_json(document)


async def checked(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run `app` on the request once its path, query and JSON body pass (see the module docstring)."""
    if scope["type"] not in ("http", "websocket"):
        await app(scope, receive, send)
        return
    try:
        _check_url(scope)
        if scope["type"] == "http" and scope["method"] in _BODY_METHODS and _is_json(scope):
            body = await read_body(receive, limit=MAX_BODY_BYTES,
                                   too_large=f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB")
            if body is None:
                return  # the client left
            _check_body(body)
            receive = _replay(body, receive)
    except (BadInput, ApiError) as exc:
        error = exc if isinstance(exc, ApiError) else ApiError(400, str(exc), code="invalid_request",
                                                                param=exc.field or None)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            reason = error.message.encode()[:120].decode(errors="ignore")  # a close reason fits 123 bytes
            await send({"type": "websocket.close", "code": 4000 + error.status, "reason": reason})
            return
        await error_response(error)(scope, receive, send)
        return
    await app(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read here once, then the connection's own messages (a disconnect)."""
    given = False

    async def again() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
