"""One mapping from failures to responses, in OpenAI's error shape: {"error": {message, type, param, code}}.

Every route (gateway and status alike) answers errors this way, so the official SDKs raise the right
exception classes and scripts have one shape to parse.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lmstack.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 502: "upstream_error",
          503: "service_unavailable", 504: "upstream_timeout"}


class ApiError(Exception):
    """An error a route raises on purpose; becomes `status` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = dict(headers or {})


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, code=error.code, param=error.param,
                                   type=error.type), status_code=error.status, headers=error.headers)


def _param(loc: Sequence[Any]) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header")]
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _param(first.get("loc", ()))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(ApiError(400, message, code="invalid_request", param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    # What needs the database (login, keys, status) while it does not answer: 503, not a 500. Serving goes on
    # (keys checked before the outage are trusted for a while: services/keys.py).
    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeoutError)
    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: the database does not answer: %s", request.method, request.url.path,
                    " ".join(str(exc).split())[:300])
        return error_response(ApiError(503, "the database does not answer; try again shortly",
                                       code="database_unavailable", headers={"Retry-After": "2"}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request.method, request.url.path)


def internal_error(method: str, path: str) -> JSONResponse:
    """The answer to an unexpected exception (call it in the `except`: the traceback goes to the log)."""
    log.exception("unhandled error on %s %s", method, path)
    return error_response(ApiError(500, "internal server error; the server log has the details"))
