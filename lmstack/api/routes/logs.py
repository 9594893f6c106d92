"""Routes: WS /api/deployments/{name}/logs?replica=N&tail=100 streams one replica's container output, a
text frame per line.

Browsers cannot set headers on a WebSocket, so the login token or API key may also come as `?token=`.
Reading logs needs an admin (engines may log prompts): an admin's login, or an admin's key with the "logs"
scope whose model allowlist (if any) names the deployment's served name. The handshake is accepted first
and a refusal is a close with 4000 + the HTTP status it stands for and a reason (a close before accepting
reaches clients as a bare HTTP 403, so browsers could not tell why): 4401 (no valid credentials), 4403 (not
an admin, or a key without the "logs" scope), 4404 (no such deployment, replica or container, or one the
key may not see), 4502 (the worker or its Docker failed), 4503 (the server cannot reach workers: no
repository or SSH key configured; or credentials cannot be checked now). Nothing is sent before the checks
pass. Once streaming: 1000 when the container's stream ends, 4502 when reading
it fails. The client leaving closes the Docker stream and its SSH connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, cast

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect, WebSocketException
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from lmstack.api.deps import Principal, authenticate
from lmstack.api.errors import ApiError
from lmstack.api.services.logs import End, LineReader, LogsError, open_stream, resolve
from lmstack.api.services.status import served_name
from lmstack.api.state import AppState

log = logging.getLogger(__name__)

_MAX_REASON_BYTES = 123  # RFC 6455: a close frame's reason fits in 123 bytes of UTF-8

router = APIRouter()


async def _ws_admin(websocket: WebSocket, token: str | None) -> Principal:
    """The HTTP routes' authentication (deps.authenticate) on the handshake, the token taken from `?token=`
    when given, else from the Authorization header; its refusals become close codes."""
    state: AppState = websocket.app.state.lmstack
    if not token and "authorization" not in websocket.headers:
        raise WebSocketException(4401, "missing credentials: pass ?token=<login token or API key> (or an "
                                       "Authorization: Bearer header)")
    scope = dict(websocket.scope)
    if token:
        scope["headers"] = [(name, value) for name, value in websocket.scope["headers"] if name != b"authorization"]
        scope["headers"].append((b"authorization", f"Bearer {token}".encode("latin-1", errors="replace")))
    try:
        # authenticate reads only what a handshake has too (headers, client), so the connection stands in
        # for a Request.
        principal = await authenticate(cast(Request, HTTPConnection(scope)), state)
    except ApiError as exc:
        raise WebSocketException(4000 + exc.status, _reason(exc.message)) from None
    if not principal.is_admin:
        raise WebSocketException(4403, "reading logs needs an admin (engines may log prompts)")
    if not principal.has_scope("logs"):
        raise WebSocketException(4403, "this API key has no 'logs' scope (lmstack keys create --scope logs)")
    return principal


def _may_see(state: AppState, principal: Principal, deployment: str) -> bool:
    """Whether a key's model allowlist names the deployment (blocking: a query)."""
    if principal.models is None:
        return True
    with state.database.session() as session:
        served = served_name(session=session, deployment=deployment)
    return served is not None and principal.sees(served)


@router.websocket("/api/deployments/{name}/logs")
async def deployment_logs(
    websocket: WebSocket,
    name: str,
    replica: Annotated[int | None, Query(ge=0, description="the replica's ordinal; default: the lowest")] = None,
    tail: Annotated[int, Query(ge=0, le=10_000, description="lines of history sent first")] = 100,
    token: Annotated[str | None, Query(description="login token or API key")] = None,
) -> None:
    state: AppState = websocket.app.state.lmstack
    await websocket.accept()
    try:
        principal = await _ws_admin(websocket, token)
        if not await run_in_threadpool(_may_see, state, principal, name):
            raise WebSocketException(4404, _reason(f"no deployment {name!r}"))
        target = await run_in_threadpool(resolve, database=state.database, repo=state.repo, deployment=name,
                                         ordinal=replica)
        session = await run_in_threadpool(open_stream, target=target, settings=state.settings, tail=tail)
    except WebSocketException as exc:
        await websocket.close(exc.code, exc.reason)
        return
    except LogsError as exc:
        await websocket.close(4000 + exc.status, _reason(exc.message))
        return
    try:
        state.metrics.log_stream_opened()
        reader = LineReader(session, loop=asyncio.get_running_loop())
        reader.start()
        closing = await _forward_until_disconnect(websocket, reader)
        if closing is not None:
            with contextlib.suppress(Exception):  # the client may have left meanwhile
                await websocket.close(*closing)
    finally:
        # Not cancellable (anyio's default): even when the server is stopping, the stream and its SSH
        # connection are closed before this handler ends.
        await run_in_threadpool(session.close)


async def _forward_until_disconnect(websocket: WebSocket, reader: LineReader) -> tuple[int, str] | None:
    """Send lines until the stream ends (the close code and reason to send) or the client leaves (None)."""
    forward = asyncio.create_task(_forward(websocket, reader))
    listen = asyncio.create_task(_until_disconnect(websocket))
    try:
        done, _ = await asyncio.wait({forward, listen}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (forward, listen):
            task.cancel()
        # Their outcomes are read below; gather only waits (and still lets this task be cancelled).
        await asyncio.gather(forward, listen, return_exceptions=True)
    if forward in done and not forward.cancelled():
        error = forward.exception()
        if error is None:
            return forward.result()
        log.error("forwarding logs failed", exc_info=error)
        return 1011, "forwarding the logs failed; the server log has the details"
    return None


async def _forward(websocket: WebSocket, reader: LineReader) -> tuple[int, str] | None:
    while True:
        item = await reader.next()
        if isinstance(item, End):
            if item.error is None:
                return 1000, "the log stream ended (the container stopped)"
            return 4502, _reason(item.error)
        try:
            await websocket.send_text(item)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return None
        reader.sent()


async def _until_disconnect(websocket: WebSocket) -> None:
    while True:  # what the client sends is ignored
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


def _reason(text: str) -> str:
    data = " ".join(text.split()).encode()
    if len(data) <= _MAX_REASON_BYTES:
        return data.decode()
    return data[: _MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."
