"""A server process's side of the hub (see the package doc): one connection, and the limits and metrics
behind the interfaces the one-process server uses."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from lmstack.api import schemas
from lmstack.api.errors import ApiError
from lmstack.api.gateway.registry import ReplicasUnavailable, Snapshot
from lmstack.api.hub.wire import LINE_LIMIT, encode, key_in, replicas_in, stamp
from lmstack.api.services.keys import CredentialsUnavailable, Rechecked
from lmstack.api.services.limits import LoginTicket, RateLimitedKey
from lmstack.api.services.ratelimit import QUEUE_FACTOR, Answer, LimitedKey, PasswordChecks, Throttled, TokensOver
from lmstack.api.services.status import View
from lmstack.state import Database

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0  # a hub that does not answer a call in this long is treated as gone for that call


class HubError(ApiError):
    """The hub did not answer a call (gone, too slow, or the call failed there): the request gets a 503."""

    def __init__(self, why: str) -> None:
        super().__init__(503, f"the server's shared limits do not answer ({why}); try again shortly",
                         code="server_unavailable", headers={"Retry-After": "1"})


class HubClient:
    """One connection to the hub. `send` a record (no answer; written at the end of this event-loop turn with
    everything else sent in it), `call` for an answer. `on_lost` runs once when the connection ends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_lost: Callable[[], None]) -> None:
        self._reader = reader
        self._writer = writer
        self._on_lost = on_lost
        self._numbers = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._out: list[bytes] = []
        self._flush_soon = False
        self._lost = False
        self._loop = asyncio.get_running_loop()
        self._reading = self._loop.create_task(self._read())

    @classmethod
    async def connect(cls, path: Path, *, on_lost: Callable[[], None]) -> HubClient:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=LINE_LIMIT)
        return cls(reader, writer, on_lost)

    def send(self, op: str, *args: Any) -> None:
        if self._lost:
            return
        self._out.append(encode([0, op, args]))
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    async def call(self, op: str, *args: Any) -> Any:
        if self._lost:
            raise HubError("the hub is gone")
        number = next(self._numbers)
        answer = self._waiting[number] = self._loop.create_future()
        self._out.append(encode([number, op, args]))
        self._flush()  # at once: this coroutine waits for it
        timer = self._loop.call_later(CALL_TIMEOUT_S, self._timed_out, number)
        try:
            return await answer
        finally:
            timer.cancel()

    def _timed_out(self, number: int) -> None:
        answer = self._waiting.pop(number, None)
        if answer is not None and not answer.done():
            answer.set_exception(HubError(f"the hub did not answer in {CALL_TIMEOUT_S:.0f} s"))

    def _flush(self) -> None:
        self._flush_soon = False
        if self._out and not self._lost:
            self._writer.write(b"".join(self._out))
            self._out.clear()

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                number, *answer = json.loads(line)
                waiting = self._waiting.pop(number, None)
                if waiting is None or waiting.done():
                    continue
                if len(answer) > 1:
                    waiting.set_exception(HubError(answer[1]))
                else:
                    waiting.set_result(answer[0])
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.error("the connection to the hub failed: %s", exc)
        self._lost = True
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(HubError("the hub is gone"))
        self._waiting.clear()
        self._on_lost()

    async def close(self) -> None:
        self._flush()
        self._lost = True
        self._reading.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


def _models(view: View) -> list[str] | None:
    return sorted(view.models) if view.models is not None else None


class SharedLimits:
    """services/limits.Limits kept by the hub: one round trip per check, and only for a key with that limit."""

    def __init__(self, hub: HubClient, *, login_concurrency: int) -> None:
        self._hub = hub
        self.password_checks = PasswordChecks(concurrency=login_concurrency,
                                              queue=QUEUE_FACTOR * login_concurrency)
        self._token_limited: set[int] = set()  # keys with a token limit: only their answers are sent

    async def rate(self, key: RateLimitedKey) -> float | None:
        if key.rpm_limit is None:
            return None
        wait: float | None = await self._hub.call("rate", key.id, key.rpm_limit)
        return wait

    async def tokens_over(self, key: LimitedKey) -> TokensOver | None:
        if key.tpm_limit is None and key.tpd_limit is None:
            return None
        self._token_limited.add(key.id)
        over = await self._hub.call("tokens_over", key.id, key.tpm_limit, key.tpd_limit, key.tokens_today,
                                    stamp(key.tokens_read_at))
        return None if over is None else TokensOver(*over)

    def used(self, answer: Answer) -> None:
        if answer.key_id in self._token_limited:
            self._hub.send("used", answer.key_id, answer.prompt_tokens, answer.completion_tokens, answer.at)

    def written(self, answers: Iterable[Answer], *, at: datetime | None) -> None:
        rows = [[a.key_id, a.prompt_tokens, a.completion_tokens, a.at] for a in answers
                if a.key_id in self._token_limited]
        if rows:
            self._hub.send("written", rows, stamp(at))

    async def admit_login(self, user: str, address: str) -> LoginTicket:
        number, wait = await self._hub.call("login", user, address)
        if number is None:
            raise Throttled(wait)
        return _Ticket(self._hub, number)


class _Ticket:
    def __init__(self, hub: HubClient, number: int) -> None:
        self._hub = hub
        self._number = number

    def succeeded(self) -> None:
        self._hub.send("login_done", self._number, True)

    def cancel(self) -> None:
        self._hub.send("login_done", self._number, False)


class SharedMetrics:
    """services/metrics.MetricsRecorder kept by the hub: records are sent, reads are calls."""

    def __init__(self, hub: HubClient) -> None:
        self._hub = hub

    def answered(self, model: str, status: int | str, seconds: float, ttft_s: float | None, prompt: int,
                 completion: int) -> None:
        self._hub.send("answered", model, status, seconds, ttft_s, prompt, completion)

    def upstream_failed(self, model: str, reason: str) -> None:
        self._hub.send("upstream_failed", model, reason)

    def usage_dropped(self, n: int = 1) -> None:
        if n > 0:
            self._hub.send("usage_dropped", n)

    def log_stream_opened(self) -> None:
        self._hub.send("log_stream")

    async def render(self, *, database: Database, view: View) -> bytes:
        # The hub reads the fleet from its own connection to the same database.
        text: str = await self._hub.call("metrics", _models(view))
        return text.encode()

    async def traffic_snapshot(self, view: View) -> schemas.Traffic:
        return schemas.Traffic.model_validate(await self._hub.call("traffic", _models(view)))


class SharedReads:
    """The key cache's re-checks and the registry's reads, made by the hub once for every process."""

    def __init__(self, hub: HubClient) -> None:
        self._hub = hub

    async def rechecks(self, key_ids: list[int], user_names: list[str], used_lately: set[int]) -> Rechecked:
        """For KeyCache(rechecks=...)."""
        try:
            answer = await self._hub.call("recheck", key_ids, user_names, sorted(used_lately))
        except HubError as exc:
            raise CredentialsUnavailable(exc.message) from None
        if answer is None:
            raise CredentialsUnavailable("the database does not answer")
        started, infos, roles = answer
        return {info.id: info for info in map(key_in, infos)}, roles, started

    async def replicas(self) -> Snapshot:
        """For Registry(read=...)."""
        try:
            found = await self._hub.call("replicas")
        except HubError as exc:
            raise ReplicasUnavailable(exc.message) from None
        if found is None:
            raise ReplicasUnavailable("the supervisor cannot read the replicas from the database")
        return replicas_in(found)


class SharedPoke:
    """The controller's poke (the Git webhook), for a controller that runs in the supervisor."""

    def __init__(self, hub: HubClient) -> None:
        self._hub = hub

    def poke(self, reason: str) -> None:
        self._hub.send("poke", reason)
