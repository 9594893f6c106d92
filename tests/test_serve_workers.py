"""`lmstack serve --workers 2`: two real server processes on one port (the real CLI, a stand-in engine, the
real PostgreSQL). A key's requests a minute and tokens a minute, the login windows, /metrics and /api/traffic
hold across the processes, as if there were one; a process killed is replaced with the limits intact; the
supervisor killed takes its processes with it.

Every request goes on a new connection, so the kernel spreads them over both processes (the test checks that
both served); with limits kept per process, each process would allow the whole limit.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from apiserver import ServeProcess
from test_auth import PASSWORD
from test_auth import add_user as add_user_with_password
from test_gateway import Standin, add_key, serve_model, standins, wait_for
from test_token_limits import limited_key

from lmstack.api.hub.client import HubClient, SharedPoke, SharedReads
from lmstack.api.hub.server import Hub
from lmstack.api.services.keys import revoke_key
from lmstack.config import Settings, usable_cores
from lmstack.state import Database

__all__ = ["standins"]  # a fixture: imported for the tests below


def _post(url: str, body: dict[str, Any], token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _get(url: str, token: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Connection": "close"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        body: bytes = answer.read()
        return body


def _chat(server: ServeProcess, key: str) -> tuple[int, dict[str, Any]]:
    return _post(f"{server.url}/v1/chat/completions",
                 {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, key)


def _server_processes(server: ServeProcess) -> list[psutil.Process]:
    """The supervisor's children that listen on the server's port."""
    assert server.process is not None
    return [child for child in psutil.Process(server.process.pid).children()
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
                   for c in child.net_connections("tcp"))]


def _holds(process: psutil.Process, port: int) -> bool:
    """Whether `process` holds a client's connection to `port`."""
    return any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in process.net_connections("tcp"))


def _chat_on(connection: http.client.HTTPConnection, key: str) -> int:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    connection.request("POST", "/v1/chat/completions", body=body,
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    answer = connection.getresponse()
    answer.read()
    connection.close()
    return answer.status


def _requests_metric(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith('lmstack_requests_total{model="m"'):
            status = line.split('status="')[1].split('"')[0]
            found[status] = float(line.rsplit(" ", 1)[1])
    return found


def test_two_processes_keep_one_set_of_limits_metrics_and_login_windows(
        db: Database, database_url: str, standins: Callable[..., Standin]) -> None:
    engine = standins("m")
    serve_model(db, [engine])
    rpm_key, _ = add_key(db, rpm_limit=10, name="ten a minute")
    reader, _ = add_key(db, name="reader", scopes=["metrics", "status"])
    add_user_with_password(db, "bob")
    env = {"LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": "/nonexistent-home",
           "LMSTACK_JWT_SECRET": "x" * 32, "LMSTACK_REGISTRY_REFRESH_S": "0.1", "LMSTACK_USAGE_FLUSH_S": "0.1",
           "LMSTACK_LOGIN_ATTEMPTS": "3"}
    with ServeProcess(env, workers=2) as server:
        wait_for("two server processes", lambda: len(_server_processes(server)) == 2, timeout=30)
        processes = _server_processes(server)

        # Requests a minute: 16 at once, each on its own connection, for a key allowed 10. The connections are
        # open, and both processes hold some, before any request is sent.
        connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(16)]
        for connection in connections:
            connection.connect()
        wait_for("both processes to hold connections", lambda: all(_holds(p, server.port) for p in processes))
        with ThreadPoolExecutor(16) as pool:
            statuses = Counter(pool.map(lambda connection: _chat_on(connection, rpm_key), connections))
        assert statuses == {200: 10, 429: 6}, statuses

        # /metrics and /api/traffic say the same whichever process answers (once the last records arrived).
        wait_for("every request counted", lambda: _requests_metric(_get(f"{server.url}/metrics", reader).decode())
                 == {"200": 10.0, "429": 6.0}, timeout=5)
        for _ in range(6):
            assert _requests_metric(_get(f"{server.url}/metrics", reader).decode()) == {"200": 10.0, "429": 6.0}
            traffic = json.loads(_get(f"{server.url}/api/traffic", reader))
            assert [sum(series["requests"]) for series in traffic["models"]] == [16]

        # Tokens a minute: each answer's tokens count for the next request, whichever process takes it.
        per_request = _chat(server, reader)[1]["usage"]["total_tokens"]

        def tokens_counted() -> int:
            series = json.loads(_get(f"{server.url}/api/traffic", reader))["models"][0]
            return int(sum(series["promptTokens"]) + sum(series["completionTokens"]))

        # The answering process sends its record a moment after the answer's last byte.
        wait_for("the tokens of 10 + 1 answers", lambda: tokens_counted() == 11 * per_request, timeout=5)
        tpm_key, _ = limited_key(db, name="tokens", tpm=2 * per_request + 1)
        answers = []
        for _ in range(6):
            answers.append(_chat(server, tpm_key)[0])
            time.sleep(0.05)  # the answer's tokens reach the hub a moment after its last byte
        assert answers == [200, 200, 200, 429, 429, 429]

        # Login attempts: 3 failures a minute per user and address, counted once across the processes.
        logins = [_post(f"{server.url}/api/auth/login", {"username": "bob", "password": "wrong"})[0]
                  for _ in range(6)]
        assert logins == [401, 401, 401, 429, 429, 429]
        assert _post(f"{server.url}/api/auth/login", {"username": "bob", "password": PASSWORD})[0] == 429

        # A process killed is replaced; the limits live in the supervisor and are intact.
        processes[0].send_signal(signal.SIGKILL)
        wait_for("a new server process", lambda: len(_server_processes(server)) == 2
                 and processes[0].pid not in {p.pid for p in _server_processes(server)}, timeout=30)
        assert {_chat(server, rpm_key)[0] for _ in range(6)} == {429}

        # The supervisor killed: its processes end too, and the port is free.
        processes = _server_processes(server)
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        _, alive = psutil.wait_procs(processes, timeout=15)
        assert not alive, f"server processes left running: {alive}"


def test_the_hub_reads_keys_and_replicas_once_for_every_process(
        db: Database, database_url: str, standins: Callable[..., Standin], tmp_path: Path) -> None:
    """Eight processes refreshing their keys and replicas as often as one would: the hub makes the queries for
    all of them (bounded by the refresh intervals, not by the processes), and each gets the right answer. A
    process's webhook pokes the supervisor's controller."""
    serve_model(db, [standins("m")])
    _, first = add_key(db, name="first")
    _, second = add_key(db, name="second")
    pokes: list[str] = []
    hub = Hub(Settings(database_url=database_url, key_cache_s=1.0, registry_refresh_s=0.2), db, poke=pokes.append)
    hub.start(tmp_path / "hub.sock")
    asks = 10

    async def process(reads: SharedReads) -> None:
        for _ in range(asks):
            snapshot = await reads.replicas()
            assert [row.served_name for row in snapshot.replicas] == ["m"]
            infos, roles, _ = await reads.rechecks([first, second], ["alice"], {first})
            assert sorted(infos) == [first, second] and infos[first].name == "first" and roles == {"alice": "viewer"}
            await asyncio.sleep(0.2)

    async def scenario() -> list[int]:
        clients = [await HubClient.connect(tmp_path / "hub.sock", on_lost=lambda: None) for _ in range(8)]
        started = time.monotonic()
        await asyncio.gather(*(process(SharedReads(client)) for client in clients))
        elapsed = time.monotonic() - started
        with db.session() as session:
            revoke_key(session, key_id=second)
        await asyncio.sleep(0.3)  # more than key_cache_s / 4: the next re-check reads again
        infos, _, _ = await SharedReads(clients[0]).rechecks([first, second], [], set())
        SharedPoke(clients[1]).poke("webhook")
        assert await clients[1].call("hello") == {"controller": True}  # handled after the poke sent before it
        for client in clients:
            await client.close()
        return [math.ceil(elapsed / 0.1) + 1, math.ceil(elapsed / 0.25) + 1, *infos]

    try:
        most_replica_reads, most_key_reads, *usable = asyncio.run(scenario())
    finally:
        hub.stop()
    assert hub.replica_reads <= most_replica_reads < 8 * asks, hub.replica_reads
    assert hub.key_reads <= most_key_reads + 1 < 8 * asks, hub.key_reads  # + the read after the revocation
    assert usable == [first]  # the revoked key is gone from the next read
    assert pokes == ["webhook"]


def test_the_default_number_of_processes_is_the_cores_the_server_may_use(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    mine = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path / "missing") == mine  # no cgroup quota: the cores it may run on
    for quota, cores in (("max 100000", mine), ("50000 100000", 1), ("100000 100000", 1),
                         ("150000 100000", min(mine, 2)), (f"{(mine + 4) * 100000} 100000", mine), ("garbage", mine)):
        cpu_max.write_text(quota + "\n")
        assert usable_cores(cpu_max) == cores, quota
    assert Settings(database_url="postgresql://x@h/d").workers == usable_cores()
