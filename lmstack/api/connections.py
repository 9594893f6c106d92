"""The HTTP server's own limits on connections, as a uvicorn protocol (`guarded_protocol(settings)` is what
`uvicorn.Config(http=...)` takes). uvicorn closes a connection idle between requests (timeout_keep_alive)
but waits forever for one that never completes its headers, and takes any number of connections.

What each connection gets, on top of uvicorn's httptools protocol:
- connection_made: over `max_connections_per_ip` open from its address -> closed at once (aborted, nothing
  sent). Otherwise counted, and the header timer armed.
- header timer (`header_timeout_s`): armed when the connection opens and when a new request starts
  (on_message_begin, e.g. the next one on a kept-alive connection); disarmed when the headers are
  complete. If it fires first the connection is closed. A silent connection and one sending half a header
  (slowloris) end alike.
- body timer (`idle_timeout_s`): while a request body is being received, each piece re-arms it; it fires
  only while reading is not paused by the server itself (flow control). A client that stops sending
  mid-body is closed.
- between requests uvicorn's own keep-alive timeout (Config.timeout_keep_alive = `idle_timeout_s`).
- connection_lost / WebSocket upgrade: timers cancelled, the address's count released (a WebSocket is
  authenticated by its route and answered by another protocol).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from lmstack.config import Settings


def guarded_protocol(settings: Settings, *, processes: int = 1) -> type[asyncio.Protocol]:
    """A protocol class for one server process: its connections per address are counted together. One of
    `processes` sharing the port (api/hub) takes its share of the bound: the kernel spreads an address's
    connections over them evenly, so together they hold about the bound, never more."""

    class Guarded(_GuardedProtocol):
        header_timeout_s = settings.header_timeout_s
        idle_timeout_s = settings.idle_timeout_s
        max_per_address = max(1, settings.max_connections_per_ip // processes)
        open_per_address: ClassVar[Counter[str]] = Counter()

    return Guarded


class _GuardedProtocol(HttpToolsProtocol):
    header_timeout_s: float
    idle_timeout_s: float
    max_per_address: int
    open_per_address: ClassVar[Counter[str]]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._address: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if self.open_per_address[address] >= self.max_per_address:
            transport.abort()  # never handed to uvicorn: no state to undo
            return
        self.open_per_address[address] += 1
        self._address = address
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._address is None:
            return  # refused in connection_made
        self._release()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._release()
        super().handle_websocket_upgrade()

    def _release(self) -> None:
        self._cancel_timers()
        if self._address is not None:
            self.open_per_address[self._address] -= 1
            if self.open_per_address[self._address] <= 0:
                del self.open_per_address[self._address]
            self._address = None

    # -- the header timer --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body:
            self._arm_body_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self._address is not None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _too_slow(self) -> None:
        self._header_timer = None
        self.transport.close()

    # -- the body timer ----------------------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm_body_timer()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.idle_timeout_s, self._body_stalled)

    def _body_stalled(self) -> None:
        self._body_timer = None
        if self.flow is not None and self.flow.read_paused:
            self._arm_body_timer()  # the server stopped reading, not the client sending
            return
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
