"""The gateway's HTTP/1.1 client to the engines: one POST at a time per connection, kept-alive connections
pooled per engine, answers read as they arrive.

Why not aiohttp (used before): a request sits on the gateway's path to the first token twice, once going
out and once coming back. On the real-model bench (bench/real_model.py, 2 cores), aiohttp took 0.7 ms from
`post()` to the request's first packet (on Python 3.11 it writes the body from a task of its own, and builds a
request object of some twenty parts); this client writes the request from the caller, in one `write`. The
engines are ours to start and speak plain HTTP/1.1 (vLLM and SGLang through uvicorn, llama.cpp's server,
Ollama), so what it needs is small: a status line, headers, a body by length, chunks or until close (httptools
parses them), and the failures told apart.

Failures: `ConnectError` (the engine could not be reached: nothing was sent), `Dropped` (the connection broke
before the answer's status line; `reused` says whether it had served a request before, when the engine may
simply have closed it for being idle), `Broken` (it broke in the middle of the answer), `BadAnswer` (not
HTTP), and `TimeoutError` (connecting, or waiting for the next bytes of the answer).

Waiting: a streamed answer must start (status line and first event) within `first_byte_timeout_s` and then
never fall silent for `idle_timeout_s`; a whole answer must start within `read_timeout_s` (it is sent when
the generation ends). A host that goes away is noticed by TCP itself within `dead_host_s` (keepalive probes
while the engine is silent, and TCP_USER_TIMEOUT on data it does not acknowledge), whatever those are.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 256 * 1024  # bytes of answer buffered before reading pauses (the client reads slower)


class UpstreamError(Exception):
    """A request to an engine failed."""


class ConnectError(UpstreamError):
    """The engine could not be reached (refused, unreachable, no such host): nothing was sent."""


class Dropped(UpstreamError):
    """The connection broke after it was made, before the answer's status line."""

    def __init__(self, message: str, *, reused: bool) -> None:
        super().__init__(message)
        self.reused = reused  # it had served requests before: the engine may have closed it as idle


class Broken(UpstreamError):
    """The connection broke in the middle of the answer."""


class BadAnswer(UpstreamError):
    """What the engine sent is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str  # for connecting
    port: int
    authority: bytes  # the Host header
    prefix: str  # the endpoint's path, if it has one


class UpstreamResponse:
    """An answer whose status line and headers have arrived; the body is read with `read()` or `chunks()`.

    `close()` (always call it, or read the body to its end) hands a finished connection back to the pool and
    drops an unfinished one: the engine sees the disconnect and stops generating."""

    def __init__(self, connection: _Connection, status: int, headers: dict[str, str]) -> None:
        self._connection = connection
        self.status = status
        self.headers = headers  # lower-case names; a repeated header keeps its last value
        self._closed = False

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked encoding undone), until its end; Broken or TimeoutError if it stops."""
        connection = self._connection
        while True:
            chunk = await connection.next_chunk()
            if chunk is None:
                self.close()
                return
            yield chunk

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._connection.finish()


class _Connection(asyncio.Protocol):
    """One connection to an engine and the answer in progress on it (httptools calls the on_* methods)."""

    def __init__(self, client: UpstreamClient, origin: _Origin) -> None:
        self._client = client
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.served = 0  # answers completed on this connection
        self.idle_since = 0.0
        self._head: asyncio.Future[tuple[int, dict[str, str]]] | None = None
        self._headers: dict[str, str] = {}
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._complete = False  # the whole answer has arrived
        self._until_close = False  # the body ends when the connection does (no length, not chunked)
        self._keep_alive = False  # the engine keeps the connection open after this answer
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first_by: float | None = None  # a stream: when its first event must have come (loop time)
        self._gap_s = client.read_timeout_s  # the longest silence allowed between parts of the answer
        self._waiting_s = 0.0  # what the running timer allows (for its message)

    # -- asyncio ---------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _notice_dead_host(sock, self._client.dead_host_s)

    def data_received(self, data: bytes) -> None:
        if self._head is None:  # bytes while idle (a 408 before an idle close, say): not a connection to reuse
            self._abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadAnswer(f"not an HTTP/1.1 answer ({exc})"))
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client.forget(self)
        if self._until_close and self._head is not None and self._head.done() and not self._complete:
            self.on_message_complete()  # such a body ends with the connection
            return
        reason = f": {exc}" if exc else ""
        if isinstance(exc, TimeoutError):  # keepalive or TCP_USER_TIMEOUT: the host stopped answering
            reason = f": its host stopped answering for {self._client.dead_host_s:g}s"
        if self._head is not None and not self._head.done():
            # An idle connection the engine closed ends quietly or with a reset; a dead host is no such race.
            reused = self.served > 0 and not isinstance(exc, TimeoutError)
            self._fail(Dropped(f"the engine closed the connection before answering{reason}", reused=reused))
        elif self._head is not None and not self._complete:
            self._fail(Broken(f"the engine closed the connection in the middle of the answer{reason}"))

    # -- httptools ------------------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self._headers = {}
            return
        headers = self._headers
        self._keep_alive = self._parser.should_keep_alive()  # asked now: the parser forgets it once the answer ends
        self._until_close = "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")
        if self._head is not None and not self._head.done():
            self._cancel_timer()
            self._head.set_result((status, headers))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is not None and self._head.done():
            self._complete = True
            self._wake()

    # -- one request at a time ------------------------------------------------------------------------------

    async def request(self, data: bytes, *, stream: bool) -> UpstreamResponse:
        """Send `data` (a whole request) and wait for the answer's status line and headers. `stream`: the answer
        is streamed (its first event is awaited within first_byte_timeout_s, then no silence of idle_timeout_s)."""
        assert self.transport is not None
        client = self._client
        head_s = client.first_byte_timeout_s if stream else client.read_timeout_s
        self._first_by = self._loop.time() + head_s if stream else None
        self._gap_s = client.idle_timeout_s if stream else client.read_timeout_s
        self._headers, self._body, self._buffered = {}, collections.deque(), 0
        self._complete = self._until_close = False
        self._error = None
        self._head = head = self._loop.create_future()
        if self.closed or self.transport.is_closing():
            raise Dropped("the connection was closed before the request went out", reused=self.served > 0)
        self.transport.write(data)
        self._start_timer(head_s)
        try:
            status, headers = await head
        except BaseException:
            self._abort()
            raise
        return UpstreamResponse(self, status, headers)

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            self._waiter = self._loop.create_future()
            self._start_timer(self._gap_s if self._first_by is None else max(0.0, self._first_by - self._loop.time()))
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._cancel_timer()
        chunk = self._body.popleft()
        self._buffered -= len(chunk)
        self._first_by = None  # the first part came: from now on only the silence between parts counts
        if self._paused and self._buffered <= _HIGH_WATER // 4 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def finish(self) -> None:
        """The answer is done with: the connection goes back to the pool if the whole answer arrived and it
        may be kept, else it is closed."""
        self._cancel_timer()
        if self._complete and not self._body and self._error is None and not self.closed and self._keep_alive:
            self.served += 1
            self._head = None
            self._client.release(self)
        else:
            self._abort()

    # -- internals ------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: UpstreamError | TimeoutError) -> None:
        self._cancel_timer()
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            return
        if isinstance(error, UpstreamError):
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def _start_timer(self, seconds: float) -> None:
        self._waiting_s = seconds
        self._timer = self._loop.call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        what = "answer" if self._head is not None and not self._head.done() else "next part of the answer"
        self._fail(TimeoutError(f"no {what} within {self._waiting_s:g}s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _abort(self) -> None:
        self.closed = True
        self._client.forget(self)
        if self.transport is not None:
            self.transport.close()


class UpstreamClient:
    """Pooled connections to the engines, for the whole process (make it on the loop that uses it)."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, keepalive_s: float,
                 first_byte_timeout_s: float | None = None, idle_timeout_s: float | None = None,
                 dead_host_s: float = 6.0, limit: int = 2000) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s or read_timeout_s
        self.idle_timeout_s = idle_timeout_s or read_timeout_s
        self.dead_host_s = dead_host_s
        self.keepalive_s = keepalive_s
        self.limit = limit  # open connections at most, across engines
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._origins: dict[str, _Origin] = {}
        self._freed = asyncio.Event()
        self._closed = False

    async def post(self, endpoint: str, path: str, body: bytes, headers: dict[str, str], *,
                   stream: bool = False) -> UpstreamResponse:
        """POST `body` to `path` at `endpoint` (http://host:port, perhaps with a path prefix) and return once
        the answer's status line and headers are in. `stream`: the answer is streamed (see the timeouts)."""
        return await self.request("POST", endpoint, path, body, headers, stream=stream)

    async def request(self, method: str, endpoint: str, path: str, body: bytes, headers: dict[str, str], *,
                      stream: bool = False) -> UpstreamResponse:
        origin = self._origin(endpoint)
        lines = [f"{method} {origin.prefix}{path} HTTP/1.1", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        data = b"".join((b"\r\n".join(line.encode("latin-1") for line in lines), b"\r\nHost: ", origin.authority,
                         b"\r\n\r\n", body))
        connection = await self._connection(origin)
        return await connection.request(data, stream=stream)

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._open):
            connection._abort()

    # -- the pool -------------------------------------------------------------------------------------------

    async def _connection(self, origin: _Origin) -> _Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been closed
            if not connection.closed and now - connection.idle_since < self.keepalive_s \
                    and connection.transport is not None and not connection.transport.is_closing():
                return connection
            connection._abort()
        while len(self._open) >= self.limit:
            if not self._drop_oldest_idle():
                self._freed.clear()
                await asyncio.wait_for(self._freed.wait(), self.connect_timeout_s + 30.0)
        if self._closed:
            raise ConnectError("the gateway is shutting down")
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, origin), origin.host, origin.port),
                self.connect_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"could not connect within {self.connect_timeout_s:g}s") from None
        except OSError as exc:
            # No address in the message: it may reach API clients (the registry logs which replica failed).
            raise ConnectError(f"cannot connect: {exc.strerror or type(exc).__name__}") from None
        self._open.add(protocol)
        return protocol

    def release(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        idle = self._idle.setdefault(connection.origin, [])
        while idle and connection.idle_since - idle[0].idle_since >= self.keepalive_s:
            idle.pop(0)._abort()  # the oldest first: expired
        idle.append(connection)
        self._freed.set()

    def forget(self, connection: _Connection) -> None:
        if connection in self._open:
            self._open.discard(connection)
            self._freed.set()

    def _drop_oldest_idle(self) -> bool:
        oldest = min((c for idle in self._idle.values() for c in idle), key=lambda c: c.idle_since, default=None)
        if oldest is None:
            return False
        self._idle[oldest.origin].remove(oldest)
        oldest._abort()
        return True

    def _origin(self, endpoint: str) -> _Origin:
        origin = self._origins.get(endpoint)
        if origin is None:
            parts = urlsplit(endpoint)
            if parts.scheme != "http" or not parts.hostname:
                raise ConnectError(f"not an http:// endpoint: {endpoint!r}")
            port = parts.port or 80
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            origin = self._origins[endpoint] = _Origin(parts.hostname, port, f"{host}:{port}".encode(),
                                                       parts.path.rstrip("/"))
        return origin


def _notice_dead_host(sock: socket.socket, dead_after_s: float) -> None:
    """Make the kernel drop the connection when the engine's host stops answering for about `dead_after_s`:
    keepalive probes while nothing is sent (half the time idle, then 3 probes), and TCP_USER_TIMEOUT for data
    sent and not acknowledged. Without them a request to a host that went off the network waits for the read
    timeout (minutes)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; other systems keep their defaults
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(dead_after_s / 2)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(dead_after_s / 6)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1000, round(dead_after_s * 1000)))
