"""`create_app(settings)`: the FastAPI application. Everything stateful is built in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from lmstack import __version__
from lmstack.api.errors import install_error_handlers
from lmstack.api.routes import auth, gateway, health, keys, logs, metrics, status
from lmstack.api.security import load_or_create_secret
from lmstack.api.services.keys import KeyCache
from lmstack.api.services.metrics import Metrics
from lmstack.api.services.proxy import open_upstream_client
from lmstack.api.services.ratelimit import LoginLimiter
from lmstack.api.services.registry import Registry
from lmstack.api.services.repo import RepoView
from lmstack.api.services.usage import UsageRecorder
from lmstack.api.state import AppState
from lmstack.config import Settings
from lmstack.state import Database, open_database


class _App(FastAPI):
    """FastAPI, except that the gateway's POSTs go straight to the gateway (gateway.answer_fast), ahead of
    FastAPI's middleware and routing: on the hot path those cost more CPU than the proxying does."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = gateway.fast_path(scope)
        if path is None:
            await super().__call__(scope, receive, send)
            return
        await gateway.answer_fast(self.state.lmstack, path, scope, receive, send)


def create_app(settings: Settings, *, database: Database | None = None) -> FastAPI:
    """The app. `database`: an open Database to use (tests); by default one is opened from settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = database if database is not None else await run_in_threadpool(open_database, settings)
        secret = (settings.jwt_secret.get_secret_value() if settings.jwt_secret is not None
                  else load_or_create_secret(settings.jwt_secret_file))
        metrics_ = Metrics()
        upstream = open_upstream_client(settings)
        state = AppState(
            settings=settings, database=db, jwt_secret=secret,
            keys=KeyCache(db, ttl_s=settings.key_cache_s),
            logins=LoginLimiter(attempts=settings.login_attempts),
            registry=Registry(db, refresh_s=settings.registry_refresh_s, metrics=metrics_),
            repo=RepoView(settings, max_age_s=settings.repo_refresh_s),
            upstream=upstream,
            usage=UsageRecorder(db, max_buffer=settings.usage_buffer, flush_s=settings.usage_flush_s,
                                metrics=metrics_),
            metrics=metrics_,
        )
        app.state.lmstack = state
        await state.registry.refresh()
        tasks = [asyncio.create_task(state.registry.run()), asyncio.create_task(state.usage.run()),
                 asyncio.create_task(state.keys.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.usage.flush()
            await upstream.close()
            if database is None:
                db.close()

    app = _App(
        title="lmstack",
        version=__version__,
        description="OpenAI-compatible gateway to the models an lmstack fleet runs, and its read-only status.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for module in (health, auth, keys, gateway, status, metrics, logs):
        app.include_router(module.router)
    return app
