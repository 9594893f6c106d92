"""`create_app(settings)`: the FastAPI application. Everything stateful is built in the lifespan.

Every request but the gateway's POSTs passes the edge check first (inputs.checked: no NUL or unpaired
surrogate anywhere, no JSON nested too deeply). The API's description is served at /openapi.json behind a
login like every other route (no HTML UI: it would load its scripts from a third-party CDN); feed the
document to any OpenAPI viewer. LMSTACK_API_DOCS=false turns it off (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from lmstack import __version__
from lmstack.api.deps import authenticate
from lmstack.api.errors import install_error_handlers
from lmstack.api.gateway.proxy import open_upstream_client
from lmstack.api.gateway.registry import Registry
from lmstack.api.hub.client import HubClient, SharedLimits, SharedMetrics, SharedPoke, SharedReads
from lmstack.api.inputs import checked
from lmstack.api.routes import auth, gateway, health, hooks, keys, logs, metrics, status, traffic, ui
from lmstack.api.security import load_or_create_secret
from lmstack.api.services.keys import KeyCache
from lmstack.api.services.limits import Limits, LocalLimits
from lmstack.api.services.metrics import Metrics, MetricsRecorder
from lmstack.api.services.ratelimit import LoginLimiter
from lmstack.api.services.repo import RepoView
from lmstack.api.services.usage import UsageRecorder
from lmstack.api.state import AppState
from lmstack.config import Settings
from lmstack.controller import Controller
from lmstack.state import Database, open_database

log = logging.getLogger(__name__)


class _App(FastAPI):
    """FastAPI, except that the gateway's POSTs go straight to the gateway (gateway.answer_fast), ahead of
    FastAPI's middleware and routing: on the hot path those cost more CPU than the proxying does."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = gateway.fast_path(scope)
        if path is None:
            await checked(super().__call__, scope, receive, send)
            return
        await gateway.answer_fast(self.state.lmstack, path, scope, receive, send)


def create_app(settings: Settings, *, database: Database | None = None,
               controller: Controller | None = None, hub: Path | None = None) -> FastAPI:
    """The app. `database`: an open Database to use (tests); by default one is opened from settings.
    `controller`: started with the app and stopped with it (server.py builds it); POST /api/hooks/git pokes it.
    `hub`: the socket of the supervisor's hub when this is one of several processes (api/hub): the limits and
    metrics are the hub's, and so is the controller."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = database if database is not None else await run_in_threadpool(open_database, settings)
        secret = (settings.jwt_secret.get_secret_value() if settings.jwt_secret is not None
                  else load_or_create_secret(settings.jwt_secret_file))
        hub_client: HubClient | None = None
        reads: SharedReads | None = None
        metrics_: MetricsRecorder
        limits: Limits
        if hub is None:
            metrics_ = Metrics()
            limits = LocalLimits(logins=LoginLimiter(attempts=settings.login_attempts,
                                                     concurrency=settings.login_concurrency))
        else:
            hub_client = await HubClient.connect(hub, on_lost=_hub_lost)
            metrics_ = SharedMetrics(hub_client)
            limits = SharedLimits(hub_client, login_concurrency=settings.login_concurrency)
            reads = SharedReads(hub_client)
            if (await hub_client.call("hello"))["controller"]:
                app.state.controller = SharedPoke(hub_client)
        upstream = open_upstream_client(settings)
        state = AppState(
            settings=settings, database=db, jwt_secret=secret,
            keys=KeyCache(db, ttl_s=settings.key_cache_s, outage_grace_s=settings.key_outage_grace_s,
                          rechecks=reads.rechecks if reads is not None else None),
            limits=limits,
            registry=Registry(db, refresh_s=settings.registry_refresh_s, metrics=metrics_,
                              prefix_routing=settings.routing == "prefix",
                              read=reads.replicas if reads is not None else None),
            repo=RepoView(settings, max_age_s=settings.repo_refresh_s),
            upstream=upstream,
            usage=UsageRecorder(db, max_buffer=settings.usage_buffer, flush_s=settings.usage_flush_s,
                                metrics=metrics_, limits=limits),
            metrics=metrics_,
        )
        app.state.lmstack = state
        await state.registry.refresh()
        tasks = [asyncio.create_task(state.registry.run()), asyncio.create_task(state.usage.run()),
                 asyncio.create_task(state.keys.run())]
        if controller is not None:
            controller.start()
        try:
            yield
        finally:
            if controller is not None:
                await run_in_threadpool(controller.stop)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.usage.flush()
            await upstream.close()
            if hub_client is not None:
                await hub_client.close()
            if database is None:
                db.close()

    app = _App(
        title="lmstack",
        version=__version__,
        description="OpenAI-compatible gateway to the models an lmstack fleet runs, and its read-only status.",
        lifespan=lifespan,
        openapi_url=None, docs_url=None, redoc_url=None,  # served below, behind a login
    )
    app.state.controller = controller
    install_error_handlers(app)
    for module in (health, auth, keys, gateway, status, traffic, metrics, logs, hooks):
        app.include_router(module.router)
    app.router.routes.append(ui.dashboard_route())  # the dashboard's static files at / (no login: no data)
    if settings.api_docs:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authenticate)])
        async def openapi() -> dict[str, Any]:
            return app.openapi()
    app.openapi = lambda: _document(app)  # type: ignore[method-assign]
    return app


def _hub_lost() -> None:
    """The supervisor is gone: stop this process as SIGTERM would (uvicorn finishes what it serves)."""
    log.error("the supervisor's hub is gone; this server process stops")
    os.kill(os.getpid(), signal.SIGTERM)


def _document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, made once. FastAPI lists a 422 "Validation Error" on every route with
    parameters; this API answers those as 400 in the shared error shape (documented per route), so the
    generated 422s are dropped (GET /api/plan's own 422 stays)."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        for item in document.get("paths", {}).values():
            for operation in item.values():
                answers = operation.get("responses", {})
                generated = answers.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
                if generated.get("$ref", "").endswith("/HTTPValidationError"):
                    del answers["422"]
        for unused in ("HTTPValidationError", "ValidationError"):
            document.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = document
    return app.openapi_schema
