"""A worker that drops off the network, on the real test bed, seen through the real gateway and the official
`openai` SDK: streams in flight on it end with an error within seconds (TCP keepalive), not after the read
timeout; new requests go to the other replica; and once a pass has seen the worker down, none is sent to it,
not even after its replica's few seconds of suspicion are over.

The engines are the stand-in (tests/testbed/standin.py) in containers on node1 and node2: a stream of its
ten words takes about five seconds here (--token-delay 0.5). The worker is cut off with its link on the bed's
bridge taken down: packets to it vanish, as with a pulled cable (no reset, no refusal).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from test_apply import Fleet
from test_gateway import Gateway, add_key, start_gateway, wait_until_routed

from lmstack.state import Database

__all__ = ["start_gateway"]  # a fixture: imported for the tests below

pytestmark = pytest.mark.testbed

DEAD_HOST_S = 3.0  # the gateway's upstream_dead_host_s here (the default is 6 s)


@pytest.fixture
def fleet(tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database) -> Fleet:
    return Fleet(tmp_path, clean_testbed, standin_image, db)


def _stream(client: openai.OpenAI) -> tuple[str, float, str | None]:
    """(the text streamed, when it ended (monotonic), the error that ended it or None)."""
    text, error = "", None
    try:
        for chunk in client.chat.completions.create(model="pair", stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    except openai.APIError as exc:
        error = str(exc)
    return text, time.monotonic(), error


def test_a_worker_that_drops_off_the_network_fails_its_streams_fast_and_gets_no_new_requests(
        fleet: Fleet, start_gateway: Callable[..., Gateway]) -> None:
    fleet.remove("chat")
    fleet.remove("embed")
    fleet.write("pair", replicas=2, placement="{workers: [node1, node2], strategy: spread}",
                args=["--token-delay", "0.5"])
    fleet.commit("pair on node1 and node2")
    _, report = fleet.apply()
    assert report is not None and report.ok
    gateway = start_gateway(upstream_dead_host_s=DEAD_HOST_S)
    key, _ = add_key(fleet.database)
    wait_until_routed(gateway, "pair", 2)
    client = gateway.sdk(key, timeout=120)

    # Six streams, spread over both replicas by the gateway; node1 is cut off while they are in flight.
    results: list[tuple[str, float, str | None]] = []
    threads = [threading.Thread(target=lambda: results.append(_stream(client))) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(2.7)  # each has streamed "Hello from pair on nodeN:" by now (a word every 0.5 s)
    cut = time.monotonic()
    fleet.bed.disconnect("node1")
    for thread in threads:
        thread.join(120)

    on_node1 = [r for r in results if "on node1" in r[0]]
    on_node2 = [r for r in results if "on node2" in r[0]]
    assert on_node1 and on_node2, results  # both replicas had streams in flight
    for text, _seconds, error in on_node2:
        assert error is None and text.endswith("tokens."), (text, error)
    for text, ended, error in on_node1:
        # Ended by the gateway with an error event seconds after the cut (the stream's idle timeout is 60 s, the
        # read timeout 600 s): TCP keepalive found the host gone.
        assert error is not None and not text.endswith("tokens."), (text, error)
        assert ended - cut < DEAD_HOST_S + 3, ended - cut

    # New requests are answered by node2 (the first to try node1 waits out the connect timeout, then goes on).
    # Four at once: each stream takes 5 s.
    answers: list[tuple[str, float, str | None]] = []
    threads = [threading.Thread(target=lambda: answers.append(_stream(client))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 4, answers
    for text, _seconds, error in answers:
        assert error is None and "on node2" in text, (text, error)

    # A pass sees node1 down (its containers cannot be listed): from then on no request goes there, also
    # after the replica's suspicion (5 s) is over: none waits out a connect timeout to node1.
    fleet.apply()
    wait_for_down(gateway, "node1")
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        started = time.monotonic()
        client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert time.monotonic() - started < 2, "a request tried node1 (and waited out the connect timeout)"
    fleet.bed.reconnect("node1")


def wait_for_down(gateway: Gateway, worker: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(t.worker == worker and t.worker_down for t in gateway.state.registry.targets("pair")):
            return
        time.sleep(0.1)
    raise AssertionError(f"the gateway never saw {worker} down: {gateway.state.registry.targets('pair')}")
