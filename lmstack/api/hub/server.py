"""The hub: the state every server process shares, kept once in the supervisor (see the package doc).

The wire: one JSON array per line. From a process: `[n, op, args]`; n = 0 for a record (no answer), else a
call, answered `[n, result]` or `[n, null, error]`. A process's lines are handled in the order sent, so a call
sees every record the same process sent before it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from lmstack.api.gateway.registry import Registry
from lmstack.api.hub.wire import LINE_LIMIT, encode, key_out, replicas_out, unstamp
from lmstack.api.services.keys import WARM_FOR_S, CredentialsUnavailable, KeyCache, KeyInfo
from lmstack.api.services.metrics import Metrics
from lmstack.api.services.ratelimit import KeyRateLimiter, LoginAttempt, LoginLimiter, Throttled, TokenLimiter
from lmstack.api.services.status import View
from lmstack.config import Settings
from lmstack.state import Database, Role

log = logging.getLogger(__name__)

# A login admitted and never settled (its process died mid-check) is forgotten after this long; it stays
# counted as a failure, which errs on the side of the limit.
ATTEMPT_FORGOTTEN_S = 300.0


@dataclass(frozen=True, slots=True)
class _Key:
    """A key as TokenLimiter reads it (ratelimit.LimitedKey), from a call's arguments."""

    id: int
    tpm_limit: int | None
    tpd_limit: int | None
    tokens_today: int | None
    tokens_read_at: datetime | None


@dataclass(frozen=True, slots=True)
class _Answer:
    """An answer's tokens as TokenLimiter reads them (ratelimit.Answer)."""

    key_id: int | None
    prompt_tokens: int
    completion_tokens: int
    at: float


@dataclass(frozen=True, slots=True)
class _Rechecked:
    """The last re-check of the keys and users in use."""

    started: float
    infos: dict[int, KeyInfo]
    roles: dict[str, Role]
    keys: frozenset[int]
    users: frozenset[str]

    def covers(self, key_ids: list[int], user_names: list[str]) -> bool:
        return self.keys.issuperset(key_ids) and self.users.issuperset(user_names)


def _view(models: list[str] | None) -> View:
    """What a caller sees, from the models its key allows (None: every model)."""
    return View(models=frozenset(models) if models is not None else None)


class Hub:
    """The shared limits, metrics and controller poke, served on a Unix socket by `start(path)`."""

    def __init__(self, settings: Settings, database: Database, *, poke: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.database = database
        self.rates = KeyRateLimiter(clock=clock)
        self.tokens = TokenLimiter(clock=clock)
        self.logins = LoginLimiter(attempts=settings.login_attempts, clock=clock)
        self.metrics = Metrics()
        self._poke = poke
        # The reads each process would make on its own, made here once for all of them (see `_recheck` and
        # `_replicas`): a KeyCache and a Registry for their queries alone.
        self._keys = KeyCache(database, ttl_s=settings.key_cache_s, clock=clock)
        self._registry = Registry(database, refresh_s=settings.registry_refresh_s, metrics=self.metrics,
                                  prefix_routing=False)
        self._warm_keys: dict[int, float] = {}  # key id -> when a process last asked about it
        self._warm_users: dict[str, float] = {}
        self._due: set[int] = set()  # keys used since the last re-check (their last_used_at may be due)
        self._rechecked: _Rechecked | None = None
        self._replicas_read: tuple[float, dict[str, Any]] | None = None
        self._reading_keys = asyncio.Lock()
        self._reading_replicas = asyncio.Lock()
        self.key_reads = 0  # queries made: figures for tests
        self.replica_reads = 0
        self._clock = clock
        self._attempts: dict[int, tuple[LoginAttempt, float]] = {}
        self._last_attempt = 0
        self._calls: dict[str, Callable[..., Any]] = {
            "hello": self._hello, "rate": self.rates.check, "tokens_over": self._tokens_over,
            "login": self._login, "metrics": self._exposition, "traffic": self._traffic,
            "recheck": self._recheck, "replicas": self._replicas,
        }
        self._records: dict[str, Callable[..., None]] = {
            "used": self._used, "written": self._written, "login_done": self._login_done,
            "answered": self.metrics.answered,
            "upstream_failed": self.metrics.upstream_failed, "usage_dropped": self.metrics.usage_dropped,
            "log_stream": self.metrics.log_stream_opened, "poke": self._poked,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # -- running -------------------------------------------------------------------------------------------

    def start(self, path: Path) -> None:
        """Listen on `path` on a thread of its own; returns once it listens (raises what stopped it)."""
        started: list[BaseException | None] = []
        ready = threading.Event()

        def main() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_unix_server(self._connection, path=str(path), limit=LINE_LIMIT))
                path.chmod(0o600)
            except BaseException as exc:  # reported to start()'s caller
                started.append(exc)
                ready.set()
                loop.close()
                return
            started.append(None)
            ready.set()
            try:
                loop.run_forever()
            finally:
                self._server.close()
                loop.run_until_complete(self._server.wait_closed())
                loop.close()

        self._thread = threading.Thread(target=main, name="lmstack-hub", daemon=True)
        self._thread.start()
        ready.wait()
        if started[0] is not None:
            raise started[0]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                self._handle(line, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("hub: a server process's connection failed: %s", exc)
        finally:
            writer.close()

    def _handle(self, line: bytes, writer: asyncio.StreamWriter) -> None:
        n, op, args = json.loads(line)
        try:
            if n == 0:
                self._records[op](*args)
                return
            result = self._calls[op](*args)
        except Exception as exc:  # one bad message must not stop the hub for every process
            log.exception("hub: %s failed", op)
            if n != 0:
                writer.write(encode([n, None, f"{type(exc).__name__}: {exc}"]))
            return
        if inspect.isawaitable(result):
            asyncio.get_running_loop().create_task(self._answer_later(writer, n, result))
        else:
            writer.write(encode([n, result]))

    async def _answer_later(self, writer: asyncio.StreamWriter, n: int, result: Awaitable[Any]) -> None:
        try:
            message = [n, await result]
        except Exception as exc:
            log.exception("hub: a call failed")
            message = [n, None, f"{type(exc).__name__}: {exc}"]
        if not writer.is_closing():
            writer.write(encode(message))

    # -- the operations ------------------------------------------------------------------------------------

    def _hello(self) -> dict[str, Any]:
        return {"controller": self._poke is not None}

    def _tokens_over(self, key_id: int, tpm: int | None, tpd: int | None, today: int | None,
                     read_at: str | None) -> list[Any] | None:
        over = self.tokens.tokens_over(_Key(key_id, tpm, tpd, today, unstamp(read_at)))
        return None if over is None else [over.per, over.limit, over.used, over.retry_after]

    def _used(self, key_id: int, prompt: int, completion: int, at: float) -> None:
        self.tokens.used(_Answer(key_id, prompt, completion, at))

    def _written(self, answers: list[list[Any]], at: str | None) -> None:
        self.tokens.written((_Answer(*answer) for answer in answers), at=unstamp(at))

    def _login(self, user: str, address: str) -> list[Any]:
        """[attempt number, None] when admitted; [None, seconds to wait] when a window is full."""
        now = self._clock()
        for number in [n for n, (_, at) in self._attempts.items() if now - at > ATTEMPT_FORGOTTEN_S]:
            del self._attempts[number]
        try:
            attempt = self.logins.admit(user, address)
        except Throttled as exc:
            return [None, exc.retry_after]
        self._last_attempt += 1
        self._attempts[self._last_attempt] = (attempt, now)
        return [self._last_attempt, None]

    def _login_done(self, number: int, succeeded: bool) -> None:
        found = self._attempts.pop(number, None)
        if found is not None:
            found[0].succeeded() if succeeded else found[0].cancel()

    async def _exposition(self, models: list[str] | None) -> str:
        body = await asyncio.to_thread(self.metrics.exposition, database=self.database, view=_view(models))
        return body.decode()

    def _traffic(self, models: list[str] | None) -> dict[str, Any]:
        return self.metrics.traffic.snapshot(_view(models)).model_dump(mode="json")

    async def _recheck(self, key_ids: list[int], user_names: list[str], used_lately: list[int]) -> list[Any] | None:
        """KeyCache.refresh's re-check for one process: [the monotonic time the read began (one clock for every
        process on the machine), the usable keys among `key_ids`, {user: role} of the enabled ones among
        `user_names`]; None while the database does not answer. One query re-checks every key any process
        uses; an answer read less than ttl_s / 4 ago is given again, so the queries stay under 4 / ttl_s a
        second however many processes ask."""
        now = self._clock()
        self._warm_keys.update(dict.fromkeys(key_ids, now))
        self._warm_users.update(dict.fromkeys(user_names, now))
        self._due.update(used_lately)
        async with self._reading_keys:
            last = self._rechecked
            if (last is None or last.started < self._clock() - self._keys.ttl_s / 4
                    or not last.covers(key_ids, user_names)):
                horizon = self._clock() - WARM_FOR_S
                self._warm_keys = {k: at for k, at in self._warm_keys.items() if at > horizon}
                self._warm_users = {u: at for u, at in self._warm_users.items() if at > horizon}
                keys, users, due = list(self._warm_keys), list(self._warm_users), self._due
                self._due = set()
                started = self._clock()
                self.key_reads += 1
                try:
                    infos, roles = await asyncio.to_thread(self._keys.recheck, keys, users, due)
                except CredentialsUnavailable:
                    self._due |= due
                    return None
                last = self._rechecked = _Rechecked(started, infos, roles, frozenset(keys), frozenset(users))
        return [last.started, [key_out(last.infos[k]) for k in key_ids if k in last.infos],
                {u: last.roles[u] for u in user_names if u in last.roles}]

    async def _replicas(self) -> dict[str, Any] | None:
        """Registry.refresh's read for one process; None when the database cannot be read. An answer read less
        than refresh_s / 2 ago is given again: at most 2 reads per refresh_s however many processes ask."""
        async with self._reading_replicas:
            last = self._replicas_read
            if last is None or last[0] < self._clock() - self._registry.refresh_s / 2:
                started = self._clock()
                self.replica_reads += 1
                try:
                    snapshot = await asyncio.to_thread(self._registry.read)
                except SQLAlchemyError as exc:
                    log.warning("hub: cannot read replicas: %s", " ".join(str(exc).split())[:300])
                    return None
                last = self._replicas_read = (started, replicas_out(snapshot))
        return last[1]

    def _poked(self, reason: str) -> None:
        if self._poke is not None:
            self._poke(reason)
