"""Routes: the OpenAI-compatible gateway (/v1) and usage (/api/usage).

`/v1/chat/completions`, `/v1/completions` and `/v1/embeddings` check the request (auth, a JSON body with a
string `model`, the key's model allowlist, token and request limits, the model known and Ready) and hand it to
`gateway.proxy.forward`, which routes it to a replica. Errors use OpenAI's shape, so the official SDKs
raise their usual exceptions: 400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError,
404 NotFoundError, 429 RateLimitError, 502/503/504 InternalServerError.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from lmstack.api import schemas
from lmstack.api.deps import CurrentPrincipal, Principal, SessionDep, StateDep, principal_for
from lmstack.api.errors import ApiError, error_response, internal_error
from lmstack.api.gateway.proxy import Call, forward
from lmstack.api.inputs import read_body
from lmstack.api.services.usage import query_usage
from lmstack.api.state import AppState

router = APIRouter()


def _allowed(principal: Principal, model: str) -> bool:
    return principal.key is None or principal.key.allows(model)


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lmstack"}


@router.get("/v1/models", tags=["gateway"], responses=schemas.errors(401, 503))
async def list_models(principal: CurrentPrincipal, state: StateDep) -> dict[str, Any]:
    """The served names with at least one Ready replica (with an API key: those its allowlist permits)."""
    return {"object": "list", "data": [_model_card(name, created) for name, created in state.registry.models()
                                       if _allowed(principal, name)]}


@router.get("/v1/models/{model:path}", tags=["gateway"], responses=schemas.errors(401, 404, 503))
async def get_model(model: str, principal: CurrentPrincipal, state: StateDep) -> dict[str, Any]:
    for name, created in state.registry.models():
        if name == model and _allowed(principal, name):
            return _model_card(name, created)
    raise ApiError(404, f"The model {model!r} does not exist or has no Ready replica", code="model_not_found",
                   param="model")


# The three POST routes are answered by answer_fast (below) before FastAPI sees them (app.py's _App). Reached
# through FastAPI all the same (another ASGI wrapper, a mount), they answer with the same answer_fast: one code
# path for the gateway, whichever way a request comes in. Their declarations are what the OpenAPI document
# shows (paths, auth, answers).
_PROXIED = schemas.errors(400, 401, (403, "The API key may not use this model"), (404, "No such model"), 413,
                          (429, "The API key is over its requests or tokens a minute, or its tokens a day "
                                "(see Retry-After)"),
                          (502, "The engine failed"), (503, "No Ready replica, or credentials cannot be checked now"),
                          (504, "The engine did not answer in time"))


@router.post("/v1/chat/completions", tags=["gateway"], responses=_PROXIED)
async def chat_completions(principal: CurrentPrincipal, state: StateDep) -> Response:
    """OpenAI's chat completions, streamed or not, from a Ready replica of `model`."""
    return _Answered(state, "/v1/chat/completions")


@router.post("/v1/completions", tags=["gateway"], responses=_PROXIED)
async def completions(principal: CurrentPrincipal, state: StateDep) -> Response:
    """OpenAI's (legacy) completions, streamed or not, from a Ready replica of `model`."""
    return _Answered(state, "/v1/completions")


@router.post("/v1/embeddings", tags=["gateway"], responses=_PROXIED)
async def embeddings(principal: CurrentPrincipal, state: StateDep) -> Response:
    """OpenAI's embeddings from a Ready replica of `model`."""
    return _Answered(state, "/v1/embeddings")


class _Answered(Response):
    """A route's response that is answer_fast's answer (the body is still unread: no parameter takes it)."""

    def __init__(self, state: AppState, path: str) -> None:
        super().__init__()
        self.state, self.path = state, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await answer_fast(self.state, self.path, scope, receive, send)


async def proxy_request(state: AppState, principal: Principal, path: str, raw: bytes, *, receive: Receive,
                        started: float, at: float) -> Response:
    """Check one gateway request (body, model allowlist, model known, rate limit) and forward it.

    `started`/`at`: when the request's latency starts counting (after authentication)."""
    body = _parse(raw)
    model: str = body["model"]
    if not _allowed(principal, model):
        raise ApiError(403, f"this API key may not use model {model!r}", code="model_not_allowed", param="model")
    if not state.registry.knows(model):
        raise ApiError(404, f"The model {model!r} does not exist", code="model_not_found", param="model")
    key = principal.key
    call = Call(path=path, model=model, body=body, raw=raw, key_id=key.id if key else None,
                streamable=_ROUTES[path], started=started, at=at)
    if key is not None:
        # Tokens first: a request they refuse is not counted against the requests a minute.
        over = await state.limits.tokens_over(key)
        if over is not None:
            _refuse(state, call, over.retry_after, code=f"tokens_per_{over.per}_exceeded", message=(
                f"this API key has used {over.used} of its {over.limit} tokens a {over.per}"
                + (" (the UTC day)" if over.per == "day" else "") + f"; it frees {_frees(over.retry_after)}"))
        wait_s = await state.limits.rate(key)  # counts the request when within the limit
        if wait_s is not None:
            _refuse(state, call, wait_s, code="rate_limit_exceeded",
                    message=f"this API key is over its limit of {key.rpm_limit} requests a minute")
    return await forward(call, client=state.upstream, registry=state.registry, usage=state.usage, receive=receive)


def _refuse(state: AppState, call: Call, wait_s: float, *, code: str, message: str) -> NoReturn:
    """429 in OpenAI's shape with Retry-After (whole seconds, at least 1); recorded in usage like any answer."""
    call.answered(state.usage, 429)
    raise ApiError(429, message, code=code, headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


def _frees(wait_s: float) -> str:
    """When a token limit frees, for its message: "in 42 s", or "at 00:00 UTC (in 3 h 12 min)"."""
    seconds = max(1, math.ceil(wait_s))
    if seconds < 120:
        return f"in {seconds} s"
    at = datetime.fromtimestamp(time.time() + seconds, UTC).strftime("%H:%M UTC")
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    return f"at {at} (in {f'{hours} h ' if hours else ''}{minutes} min)"


_ROUTES = {"/v1/chat/completions": True, "/v1/completions": True, "/v1/embeddings": False}  # path: streamable


def fast_path(scope: Scope) -> str | None:
    """The gateway route a request is for when the app should answer it with `answer_fast` (a POST to one
    of the three proxied paths); None for everything else."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = _route_path(scope)
    return path if path in _ROUTES else None


async def answer_fast(state: AppState, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a gateway POST without FastAPI's routing, dependency and middleware machinery, which cost more
    CPU per request than the proxying itself (bench/gateway_overhead.py --profile).

    Same behaviour as the routes above: authentication (principal_for), then the body, then proxy_request;
    ApiErrors become OpenAI-shaped answers, anything unexpected before the answer starts a logged 500.
    """
    response: Response
    try:
        principal = await principal_for(_header(scope, b"authorization"), state)
        started, at = time.perf_counter(), time.time()
        limit = _limit(state)
        raw = await read_body(receive, limit=limit, too_large=f"the request body is larger than "
                              f"{limit // (1024 * 1024)} MiB (LMSTACK_MAX_REQUEST_MB)")
        if raw is None:
            return  # gone while sending its request: nobody to answer
        response = await proxy_request(state, principal, path, raw, receive=receive, started=started, at=at)
    except ApiError as exc:
        response = error_response(exc)
    except Exception:
        response = internal_error(scope["method"], scope["path"])
    await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def _limit(state: AppState) -> int:
    return int(state.settings.max_request_mb * 1024 * 1024)




def _parse(raw: bytes) -> dict[str, Any]:
    """The body as JSON, with the fields the gateway itself reads checked: `model` a non-empty string,
    `stream` a boolean (`"stream": 1` would stream while usage counted it as not streaming) and
    `stream_options` an object. The rest is the engine's to judge."""
    try:
        body = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        what = "missing" if model is None else "not a non-empty string"
        raise ApiError(400, f"'model' is {what}: name the model to use (GET /v1/models lists them)",
                       code="missing_model" if model is None else "invalid_model", param="model")
    stream = body.get("stream")
    if stream is not None and stream.__class__ is not bool:  # not isinstance: 1 and 0 are not booleans here
        raise ApiError(400, "'stream' must be true or false", code="invalid_type", param="stream")
    options = body.get("stream_options")
    if options is not None:
        if options.__class__ is not dict:
            raise ApiError(400, "'stream_options' must be an object", code="invalid_type", param="stream_options")
        usage = options.get("include_usage")
        if usage is not None and usage.__class__ is not bool:
            raise ApiError(400, "'stream_options.include_usage' must be true or false", code="invalid_type",
                           param="stream_options.include_usage")
    return body


@router.get("/api/usage", tags=["usage"], responses=schemas.errors(400, 401, 503))
def usage(
    principal: CurrentPrincipal,
    session: SessionDep,
    since: Annotated[datetime | None, Query(alias="from", description="first hour (inclusive, ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(alias="to", description="end hour (exclusive, ISO 8601)")] = None,
    model: Annotated[str | None, Query(description="only this served name")] = None,
    key: Annotated[int | None, Query(description="only this API key id")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    """Usage rolled up per API key, model and hour, newest first: an admin's login sees all, others their own
    keys'. An API key acts as at most its own user, limited to its models (an admin's key too).

    Written every few seconds (LMSTACK_USAGE_FLUSH_S), so the current hour lags slightly.
    """
    everyone = principal.is_admin and principal.key is None
    rows = query_usage(session, user=None if everyone else principal.user, models=principal.models, since=since,
                       until=until, model=model, key_id=key, limit=limit)
    return {"object": "list", "data": rows}
