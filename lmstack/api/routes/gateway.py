"""Routes: the OpenAI-compatible gateway (/v1) and usage (/api/usage).

`/v1/chat/completions`, `/v1/completions` and `/v1/embeddings` check the request (auth, a JSON body with a
string `model`, the key's model allowlist and rate limit, the model known and Ready) and hand it to
`services.proxy.forward`, which routes it to a replica. Errors use OpenAI's shape, so the official SDKs
raise their usual exceptions: 400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError,
404 NotFoundError, 429 RateLimitError, 502/503/504 InternalServerError.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from lmstack.api.deps import CurrentPrincipal, Principal, SessionDep, StateDep
from lmstack.api.errors import ApiError
from lmstack.api.services.proxy import CLIENT_CLOSED, Call, forward
from lmstack.api.services.usage import query_usage
from lmstack.api.state import AppState

router = APIRouter()


def _allowed(principal: Principal, model: str) -> bool:
    return principal.key is None or principal.key.allows(model)


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lmstack"}


@router.get("/v1/models", tags=["gateway"])
async def list_models(principal: CurrentPrincipal, state: StateDep) -> dict[str, Any]:
    """The served names with at least one Ready replica (with an API key: those its allowlist permits)."""
    return {"object": "list", "data": [_model_card(name, created) for name, created in state.registry.models()
                                       if _allowed(principal, name)]}


@router.get("/v1/models/{model:path}", tags=["gateway"])
async def get_model(model: str, principal: CurrentPrincipal, state: StateDep) -> dict[str, Any]:
    for name, created in state.registry.models():
        if name == model and _allowed(principal, name):
            return _model_card(name, created)
    raise ApiError(404, f"The model {model!r} does not exist or has no Ready replica", code="model_not_found",
                   param="model")


@router.post("/v1/chat/completions", tags=["gateway"])
async def chat_completions(request: Request, principal: CurrentPrincipal, state: StateDep) -> Response:
    return await _proxy(request, principal, state, "/v1/chat/completions")


@router.post("/v1/completions", tags=["gateway"])
async def completions(request: Request, principal: CurrentPrincipal, state: StateDep) -> Response:
    return await _proxy(request, principal, state, "/v1/completions")


@router.post("/v1/embeddings", tags=["gateway"])
async def embeddings(request: Request, principal: CurrentPrincipal, state: StateDep) -> Response:
    return await _proxy(request, principal, state, "/v1/embeddings", streamable=False)


async def _proxy(request: Request, principal: CurrentPrincipal, state: AppState, path: str, *,
                 streamable: bool = True) -> Response:
    started, at = time.perf_counter(), time.time()  # latency counts from here (after authentication)
    try:
        raw = await request.body()  # read once: forwarded as is unless the model name or stream options change
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED)  # gone while sending its request: nobody to answer
    body = _parse(raw)
    model: str = body["model"]
    if not _allowed(principal, model):
        raise ApiError(403, f"this API key may not use model {model!r}", code="model_not_allowed", param="model")
    if not state.registry.knows(model):
        raise ApiError(404, f"The model {model!r} does not exist", code="model_not_found", param="model")
    key = principal.key
    call = Call(path=path, model=model, body=body, raw=raw, key_id=key.id if key else None,
                streamable=streamable, started=started, at=at)
    if key is not None:
        wait_s = state.keys.check_rate(key)  # counts the request when within the limit
        if wait_s is not None:
            state.usage.record(key_id=key.id, model=model, replica=None, status=429, latency_ms=call.elapsed_ms(),
                               at=call.at)
            raise ApiError(429, f"this API key is over its limit of {key.rpm_limit} requests a minute",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
    return await forward(call, client=state.upstream, registry=state.registry, usage=state.usage,
                         receive=request.receive)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        what = "missing" if model is None else "not a non-empty string"
        raise ApiError(400, f"'model' is {what}: name the model to use (GET /v1/models lists them)",
                       code="missing_model" if model is None else "invalid_model", param="model")
    return body


@router.get("/api/usage", tags=["usage"])
def usage(
    principal: CurrentPrincipal,
    session: SessionDep,
    since: Annotated[datetime | None, Query(alias="from", description="first hour (inclusive, ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(alias="to", description="end hour (exclusive, ISO 8601)")] = None,
    model: Annotated[str | None, Query(description="only this served name")] = None,
    key: Annotated[int | None, Query(description="only this API key id")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    """Usage rolled up per API key, model and hour, newest first: admins see all, others their own keys'.

    Written every few seconds (LMSTACK_USAGE_FLUSH_S), so the current hour lags slightly.
    """
    rows = query_usage(session, user=None if principal.is_admin else principal.user, since=since, until=until,
                       model=model, key_id=key, limit=limit)
    return {"object": "list", "data": rows}
