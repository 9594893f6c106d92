"""Running the API under uvicorn (`lmstack serve`): logging, the connection limits (api/connections.py), the
open-files limit raised, and the database opened before listening so a wrong LMSTACK_DATABASE_URL fails at
once with a clear message."""

from __future__ import annotations

import gc
import logging
import math
import re
import resource
import sys
from typing import Any

import uvicorn

from lmstack.api.app import create_app
from lmstack.api.connections import guarded_protocol
from lmstack.config import Settings, SshFilesError
from lmstack.controller import build_controller
from lmstack.gitsource.repo import redact
from lmstack.state import open_database

log = logging.getLogger("lmstack.api")

# WebSocket clients (browsers) pass their token in the query string, and uvicorn logs request paths with it.
_TOKEN_IN_QUERY = re.compile(r"([?&](?:token|access_token)=)[^&\s\"]*")


class RedactTokens(logging.Filter):
    """Replaces `?token=...` in uvicorn's request lines with `?token=***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(arg, str) and "token=" in arg for arg in record.args):
            record.args = tuple(_TOKEN_IN_QUERY.sub(r"\1***", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = _TOKEN_IN_QUERY.sub(r"\1***", record.msg)
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """lmstack's and uvicorn's loggers to stderr (uvicorn is told not to replace this: log_config=None)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("lmstack", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
        if name.startswith("uvicorn"):
            logger.addFilter(RedactTokens())


def tune_gc() -> None:
    """Call once everything long-lived is loaded, before serving.

    Everything loaded so far (modules, the app, SQLAlchemy's and pydantic's machinery) lives as long as the
    process: frozen, the collector stops walking it on every full collection. Those walks were the gateway's
    p99 at high load. Each request allocates a few hundred objects, nearly all freed by reference counting,
    so young collections can be rarer too. bench/gateway_overhead.py, c=256: 2,900 -> 3,550 req/s (p99
    183 -> 90 ms) frozen, 4,040 req/s with these thresholds.
    """
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one (often 1,024 of 524,288): every client connection is
    a file, and at the soft limit the server stops accepting any, /healthz's included. The new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def server_config(app: Any, settings: Settings, *, processes: int = 1, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration with the server's own limits: the header and idle timeouts and connections per
    address (api/connections.py), for one of `processes` server processes. `options`: more uvicorn.Config
    arguments (host, port, ...)."""
    return uvicorn.Config(app, http=guarded_protocol(settings, processes=processes),
                          timeout_keep_alive=max(1, math.ceil(settings.idle_timeout_s)), **options)


def run_server(settings: Settings, *, host: str, port: int, access_log: bool = False, workers: int = 1) -> bool:
    """Serve until interrupted (SIGINT/SIGTERM). False when the server could not start (port taken, startup
    failed); raises DatabaseError when the database cannot be used. No access line per request unless asked:
    on the gateway's hot path it costs more than the proxying (usage and /metrics record every request).
    `workers` > 1: that many server processes sharing the port, limits and metrics (api/hub)."""
    configure_logging()
    database = open_database(settings)
    try:
        log.info("state database: %s", database.url)
        log.info("open files limit: %d", raise_open_files_limit())
        try:
            controller = build_controller(settings, database)
        except SshFilesError as exc:
            log.error("the controller cannot reach the workers: %s (or set LMSTACK_CONTROLLER=false to serve "
                      "without applying)", exc)
            return False
        if controller is not None:
            log.info("controller: applying %s at %s (poll every %.0f s, drift check every %.0f s, webhook %s)",
                     redact(settings.repo or ""), settings.ref, settings.poll_interval_s, settings.drift_interval_s,
                     "on" if settings.webhook_secret is not None else "off")
        if workers > 1:
            from lmstack.api.hub.supervisor import run_workers  # it imports this module

            return run_workers(settings, database, controller, host=host, port=port, workers=workers,
                               access_log=access_log)
        app = create_app(settings, database=database, controller=controller)
        config = server_config(app, settings, host=host, port=port,
                               log_config=None, access_log=access_log, ws_ping_interval=20.0, ws_ping_timeout=20.0)
        server = uvicorn.Server(config)
        tune_gc()
        shown = f"[{host}]" if ":" in host else host
        log.info("lmstack API starting on http://%s:%d (gateway /v1, status /api, /metrics, /healthz, "
                 "API description /openapi.json)", shown, port)
        server.run()
        return bool(server.started)
    finally:
        database.close()
