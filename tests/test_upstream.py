"""The gateway's HTTP/1.1 client to the engines (lmstack.api.gateway.upstream), against a real socket server
whose answers each test scripts: pooling, the ways an answer can be framed, and the ways it can fail."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from lmstack.api.gateway.upstream import BadAnswer, Broken, ConnectError, Dropped, UpstreamClient

Handler = Callable[[socket.socket, bytes, bytes], bool]  # (connection, request head, body) -> keep the connection


@dataclass
class Engine:
    """A socket server: each request is read whole (by Content-Length) and handed to `handler`."""

    handler: Handler
    sock: socket.socket = field(default_factory=socket.socket)
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)  # each request's head

    def __post_init__(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                body, buffer = buffer[:length], buffer[length:]
                self.requests.append(head)
                try:
                    if not self.handler(conn, head, body):
                        return
                except OSError:
                    return


@pytest.fixture
def engine() -> Iterator[Callable[[Handler], Engine]]:
    started: list[Engine] = []

    def start(handler: Handler) -> Engine:
        started.append(Engine(handler))
        return started[-1]

    yield start
    for server in started:
        server.sock.close()


def answer(body: bytes, *extra: bytes) -> bytes:
    return b"\r\n".join([b"HTTP/1.1 200 OK", b"Content-Type: application/json",
                         b"Content-Length: %d" % len(body), *extra, b"", body])


def echo(conn: socket.socket, head: bytes, body: bytes) -> bool:
    conn.sendall(answer(body))
    return True


def run(coroutine_function: Callable[[UpstreamClient], object], **options: float) -> object:
    async def main() -> object:
        settings = {"connect_timeout_s": 2.0, "read_timeout_s": 2.0, "keepalive_s": 5.0, **options}
        client = UpstreamClient(**settings)  # type: ignore[arg-type]
        try:
            return await coroutine_function(client)  # type: ignore[misc]
        finally:
            await client.close()

    return asyncio.run(main())


async def post(client: UpstreamClient, endpoint: str, body: bytes = b'{"x":1}', path: str = "/v1/x") -> bytes:
    response = await client.post(endpoint, path, body, {"content-type": "application/json"})
    assert response.status == 200
    return await response.read()


def test_kept_alive_connections_are_reused_until_they_idle_out(engine):
    server = engine(echo)

    async def scenario(client: UpstreamClient) -> None:
        for i in range(5):
            assert await post(client, server.endpoint, b'{"n":%d}' % i) == b'{"n":%d}' % i
        assert server.connections == 1
        await asyncio.sleep(0.3)  # longer than keepalive_s: dropped, not reused
        await post(client, server.endpoint)
        assert server.connections == 2

    run(scenario, keepalive_s=0.2)
    head = server.requests[0].decode()
    assert head.startswith("POST /v1/x HTTP/1.1\r\n") and f"Host: {server.endpoint[7:]}" in head


def test_an_endpoint_with_a_path_prefix(engine):
    server = engine(echo)
    run(lambda client: post(client, server.endpoint + "/engine/", path="/v1/chat/completions"))
    assert server.requests[0].startswith(b"POST /engine/v1/chat/completions HTTP/1.1")


def test_chunked_answers_arrive_as_they_are_sent(engine):
    sent: list[float] = []

    def stream(conn: socket.socket, head: bytes, body: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"data: one\n\n", b"data: two\n\n"):
            sent.append(time.monotonic())
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            time.sleep(0.3)
        conn.sendall(b"0\r\n\r\n")
        return True

    server = engine(stream)

    async def scenario(client: UpstreamClient) -> list[tuple[bytes, float]]:
        response = await client.post(server.endpoint, "/v1/x", b"{}", {})
        assert response.headers["content-type"] == "text/event-stream"
        return [(chunk, time.monotonic()) async for chunk in response.chunks()]

    got = run(scenario)
    assert isinstance(got, list)
    assert b"".join(chunk for chunk, _ in got) == b"data: one\n\ndata: two\n\n"
    assert got[0][1] < sent[1]  # the first piece was read before the second was sent


def test_a_body_without_length_ends_with_the_connection_and_big_bodies_arrive_whole(engine):
    big = bytes(range(256)) * 20_000  # 5 MB: reading pauses and resumes on the way

    def until_close(conn: socket.socket, head: bytes, body: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + big)
        return False

    server = engine(until_close)
    assert run(lambda client: post(client, server.endpoint)) == big
    sized = engine(lambda conn, head, body: conn.sendall(answer(big)) or True)
    assert run(lambda client: post(client, sized.endpoint)) == big


def test_failures_are_told_apart(engine):
    def half(conn: socket.socket, head: bytes, body: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        return False

    def silent(conn: socket.socket, head: bytes, body: bytes) -> bool:
        time.sleep(1.0)
        return False

    def garbage(conn: socket.socket, head: bytes, body: bytes) -> bool:
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        return False

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening
        with pytest.raises(ConnectError, match="cannot connect"):
            run(lambda client: post(client, refused))
    with pytest.raises(Broken, match="in the middle of the answer"):
        run(lambda client: post(client, engine(half).endpoint))
    with pytest.raises(TimeoutError, match=r"no answer within 0\.3s"):
        run(lambda client: post(client, engine(silent).endpoint), read_timeout_s=0.3)
    with pytest.raises(BadAnswer):
        run(lambda client: post(client, engine(garbage).endpoint))
    with pytest.raises(Dropped) as dropped:
        run(lambda client: post(client, engine(lambda conn, head, body: False).endpoint))
    assert not dropped.value.reused  # a new connection: the engine read the request


def test_a_kept_alive_connection_closed_by_the_engine_is_dropped_as_reused(engine):
    answered: set[socket.socket] = set()

    def once(conn: socket.socket, head: bytes, body: bytes) -> bool:
        if conn in answered:
            return False  # closed as the next request comes: the engine's idle timeout, say
        answered.add(conn)
        conn.sendall(answer(body))
        return True

    server = engine(once)

    async def scenario(client: UpstreamClient) -> None:
        await post(client, server.endpoint)
        await post(client, server.endpoint)  # on the kept connection

    with pytest.raises(Dropped) as dropped:
        run(scenario)
    assert dropped.value.reused and server.connections == 1


def test_closing_an_unfinished_answer_drops_the_connection(engine):
    stopped = threading.Event()

    def endless(conn: socket.socket, head: bytes, body: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(200):
                conn.sendall(b"5\r\ntoken\r\n")
                time.sleep(0.01)
        except OSError:
            stopped.set()  # the client went away: an engine stops generating here
        return False

    server = engine(endless)

    async def scenario(client: UpstreamClient) -> None:
        response = await client.post(server.endpoint, "/v1/x", b"{}", {})
        chunks = response.chunks()
        assert await anext(chunks) == b"token"
        response.close()
        await post(client, engine(echo).endpoint)  # the client goes on

    run(scenario)
    assert stopped.wait(3)


def test_a_connection_that_speaks_while_idle_is_not_reused(engine):
    spoke = threading.Event()

    def chatty(conn: socket.socket, head: bytes, body: bytes) -> bool:
        conn.sendall(answer(body))
        time.sleep(0.05)
        conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")  # unasked, while idle
        spoke.set()
        return True

    server = engine(chatty)

    async def scenario(client: UpstreamClient) -> None:
        assert await post(client, server.endpoint, b'{"n":1}') == b'{"n":1}'
        await asyncio.to_thread(spoke.wait, 5)
        await asyncio.sleep(0.1)  # for the loop to read it
        assert await post(client, server.endpoint, b'{"n":2}') == b'{"n":2}'  # not the stray 408

    run(scenario)
    assert server.connections == 2
