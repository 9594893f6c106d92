"""Prefix-aware routing: requests whose prompts begin alike (a long system prompt, a conversation so far) go to
the replica that served that beginning, so its engine's prompt cache answers; within a bounded share of the
load; short prompts and embeddings by power of two choices. Through the real gateway (uvicorn in a thread)
and the official `openai` SDK, to two stand-in engines (tests/testbed/standin.py) that count their requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from test_gateway import Gateway, Standin, add_key, chat, serve_model, standins, start_gateway

from lmstack.api.gateway.affinity import BLOCK, PrefixTable, prompt_keys
from lmstack.state import Database

__all__ = ["standins", "start_gateway"]  # fixtures: imported for the tests below

SYSTEM = [f"You are assistant number {n}. " + "Answer briefly and cite the handbook. " * 60 for n in range(4)]


def _messages(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def test_prompt_keys_say_which_prompts_begin_alike() -> None:
    chat_path = "/v1/chat/completions"
    one = prompt_keys("m", chat_path, {"messages": _messages(SYSTEM[0], "What is 2+2?")})
    two = prompt_keys("m", chat_path, {"messages": _messages(SYSTEM[0], "Name a colour.")})
    other = prompt_keys("m", chat_path, {"messages": _messages(SYSTEM[1], "What is 2+2?")})
    shared = len(SYSTEM[0]) // BLOCK  # whole blocks of the system prompt
    assert len(one) >= shared >= 4 and one[:shared] == two[:shared] and one[:shared][-1] != other[:shared][-1]
    assert prompt_keys("n", chat_path, {"messages": _messages(SYSTEM[0], "x")})[0] != one[0]  # per model
    assert prompt_keys("m", chat_path, {"messages": _messages("Be brief.", "hi")}) == ()  # too short
    assert prompt_keys("m", "/v1/embeddings", {"input": SYSTEM[0]}) == ()
    assert prompt_keys("m", "/v1/completions", {"prompt": SYSTEM[0]})[:2] != one[:2]  # not a chat's roles
    assert prompt_keys("m", chat_path, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": SYSTEM[0]}, {"type": "image_url", "image_url": {"url": "data:..."}}]}]})


def test_the_prefix_table_keeps_the_longest_match_and_forgets_the_least_recently_used() -> None:
    table = PrefixTable(max_entries=100)
    table.remember((1, 2, 3), "a")
    table.remember((1, 2, 7, 8), "b")
    assert table.lookup((1, 2, 3, 4)) == "a" and table.lookup((1, 2, 7, 9)) == "b" and table.lookup((5,)) is None
    for n in range(1000, 1200):
        table.remember((n,), "c")
    assert len(table) <= 100 and table.lookup((1,)) is None and table.lookup((1199,)) == "c"


def test_prompt_keys_are_the_same_in_every_process() -> None:
    """The N processes of one server must agree on a prompt's keys: no per-process hash seed in them."""
    code = ("import json, sys; from lmstack.api.gateway.affinity import prompt_keys; "
            "print(json.dumps(prompt_keys('m', '/v1/chat/completions', json.loads(sys.argv[1]))))")
    body = {"messages": _messages(SYSTEM[0], "What is 2+2?")}
    seen = {subprocess.run([sys.executable, "-c", code, json.dumps(body)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(seen) == 1 and json.loads(seen.pop()) == list(prompt_keys("m", "/v1/chat/completions", body))


def test_two_server_processes_send_a_new_system_prompt_to_the_same_replica(
        db: Database, standins: Callable[..., Standin], start_gateway: Callable[..., Gateway]) -> None:
    """Two gateways with tables of their own (two processes of one server): each new system prompt lands on the
    same replica through either, so an engine's cache is not split between them."""
    engines = [standins("m"), standins("m")]
    serve_model(db, engines)
    key, _ = add_key(db)
    clients = [start_gateway().sdk(key), start_gateway().sdk(key)]
    landed: list[list[int]] = []
    for n in range(12):
        system = f"You are tenant {n}'s assistant. " + "Follow the tenant's style guide closely. " * 40
        where = []
        for client in clients:
            before = [engine.requests() for engine in engines]
            assert chat(client, messages=_messages(system, "Hello?")).choices[0].message.content
            where.append([engine.requests() - b for engine, b in zip(engines, before, strict=True)].index(1))
        landed.append(where)
    assert all(a == b for a, b in landed), landed
    assert {a for a, _ in landed} == {0, 1}, landed  # and the prompts are spread over both


def _two_replicas(db: Database, standins: Callable[..., Standin], start_gateway: Callable[..., Gateway],
                  **settings: Any) -> tuple[list[Standin], Any]:
    engines = [standins("m"), standins("m")]
    serve_model(db, engines)
    key, _ = add_key(db)
    return engines, start_gateway(**settings).sdk(key)


def test_requests_sharing_a_system_prompt_go_to_the_replica_that_served_it(
        db: Database, standins: Callable[..., Standin], start_gateway: Callable[..., Gateway]) -> None:
    engines, client = _two_replicas(db, standins, start_gateway)
    for system in SYSTEM:
        before = [engine.requests() for engine in engines]
        for turn in range(6):
            assert chat(client, messages=_messages(system, f"Question {turn}?")).choices[0].message.content
        served = [engine.requests() - b for engine, b in zip(engines, before, strict=True)]
        assert sorted(served) == [0, 6], served  # one by one: all six on one replica

    # Short prompts have no beginning worth keeping: spread by power of two choices, as before.
    before = [engine.requests() for engine in engines]
    for turn in range(40):
        chat(client, messages=[{"role": "user", "content": f"hi {turn}"}])
    served = [engine.requests() - b for engine, b in zip(engines, before, strict=True)]
    assert min(served) >= 8, served


def test_a_busy_prefix_spills_to_the_other_replica_within_the_bound(
        db: Database, standins: Callable[..., Standin], start_gateway: Callable[..., Gateway]) -> None:
    """Eight at once with one system prompt: the replica that has it takes at most its bounded share."""
    engines = [standins("m", token_delay=0.05), standins("m", token_delay=0.05)]
    serve_model(db, engines)
    key, _ = add_key(db)
    client = start_gateway().sdk(key)
    chat(client, messages=_messages(SYSTEM[0], "warm up"))
    before = [engine.requests() for engine in engines]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: chat(client, messages=_messages(SYSTEM[0], f"q{n}")), range(8)))
    served = sorted(engine.requests() - b for engine, b in zip(engines, before, strict=True))
    assert served[0] >= 2, served  # not all on the replica with the prefix


def test_with_routing_p2c_a_shared_system_prompt_is_spread(
        db: Database, standins: Callable[..., Standin], start_gateway: Callable[..., Gateway]) -> None:
    engines, client = _two_replicas(db, standins, start_gateway, routing="p2c")
    for turn in range(30):
        chat(client, messages=_messages(SYSTEM[0], f"Question {turn}?"))
    assert min(engine.requests() for engine in engines) >= 5
