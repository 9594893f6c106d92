"""Which HTTP client the gateway should use to reach engines: httpx (and httpx2, when installed), aiohttp, and
lmstack's own (lmstack/api/gateway/upstream.py), alone, without the gateway around them.

    .venv/bin/python bench/upstream_client.py
    .venv/bin/python bench/upstream_client.py --concurrency 1 32 256 --duration 3

Starts the stand-in engine of bench/gateway_overhead.py (its own process: uvicorn, uvloop, httptools), then,
in this process on uvloop, keeps C requests in flight with each client for --duration seconds (after a
1-second warm-up) the way the gateway sends them: POST /v1/chat/completions with the body as bytes, the
answer read whole, one pooled client for all. Prints requests/s and this process's CPU time per request.
The gateway used httpx, then aiohttp, because of these figures; it has its own client now for the latency
of one request (bench/real_model.py's TTFT split), and these figures say it costs no more CPU either.

Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say hello."}]}).encode()
HEADERS = {"content-type": "application/json", "accept": "application/json", "accept-encoding": "identity"}

Send = Callable[[], Awaitable[None]]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def client_for(kind: str, url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """(send one request, close) for the client `kind`."""
    if kind in ("httpx", "httpx2"):
        httpx = __import__(kind)
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=2000, max_keepalive_connections=500),
                                   trust_env=False)

        async def send_httpx() -> None:
            response = await client.send(client.build_request("POST", url, content=BODY, headers=HEADERS),
                                         stream=True)
            await response.aread()
            await response.aclose()

        return send_httpx, client.aclose
    if kind == "lmstack":
        from lmstack.api.gateway.upstream import UpstreamClient

        upstream = UpstreamClient(connect_timeout_s=10.0, read_timeout_s=60.0, keepalive_s=4.0)
        endpoint, path = url.split("/v1/", 1)

        async def send_lmstack() -> None:
            response = await upstream.post(endpoint, "/v1/" + path, BODY, HEADERS)
            await response.read()

        return send_lmstack, upstream.close
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2000, limit_per_host=0),
                                    auto_decompress=False)

    async def send_aiohttp() -> None:
        async with session.post(url, data=BODY, headers=HEADERS) as response:
            await response.read()

    return send_aiohttp, session.close


async def measure(kind: str, url: str, concurrency: int, duration_s: float) -> tuple[float, float]:
    send, close = await client_for(kind, url)
    done = 0
    stopping = False

    async def worker() -> None:
        nonlocal done
        while not stopping:
            await send()
            done += 1

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(1.0)
    done_before, cpu_before, began = done, cpu_s(), time.perf_counter()
    await asyncio.sleep(duration_s)
    answered, cpu, elapsed = done - done_before, cpu_s() - cpu_before, time.perf_counter() - began
    stopping = True
    await asyncio.gather(*workers, return_exceptions=True)
    await close()
    return answered / elapsed, cpu / max(answered, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per row (default 3)")
    args = parser.parse_args()
    import uvloop

    kinds = [k for k in ("httpx", "httpx2", "aiohttp") if importlib.util.find_spec(k) is not None] + ["lmstack"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    upstream = subprocess.Popen([sys.executable, str(BENCH / "gateway_overhead.py"), "--role", "upstream",
                                 "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or upstream.poll() is not None:
                    print("the stand-in engine did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print(f"clients: {', '.join(kinds)}; {args.duration:g} s measured per row after 1 s of warm-up")
        print(f"{'client':8} {'conc':>5} {'req/s':>9} {'CPU/req':>9}")
        for concurrency in args.concurrency:
            for kind in kinds:
                rate, cpu = uvloop.run(measure(kind, url, concurrency, args.duration))
                print(f"{kind:8} {concurrency:5} {rate:9.0f} {cpu * 1e6:7.0f}us", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
