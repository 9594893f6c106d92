"""The gateway through a PostgreSQL outage: a server of the test's own (tests/pgserver.py) is stopped while
the gateway serves a stand-in engine (tests/testbed/standin.py) to the official `openai` SDK. Keys and logins
checked before the outage keep working from the last replica list; what needs the database (a key never
seen, logging in, managing keys) gets a clear 503; a key revoked once the database is back is refused within
a second or two.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import update
from test_gateway import Gateway, add_key, chat, serve_model, standins, start_gateway, wait_for

from lmstack.config import Settings
from lmstack.state import ApiKey, open_database

__all__ = ["standins", "start_gateway"]  # fixtures: imported for the test below


def test_serving_goes_on_through_a_database_outage(standins: Callable[..., Any], throwaway_postgres: Any,
                                                    start_gateway: Callable[..., Gateway]) -> None:
    database = open_database(Settings(database_url=throwaway_postgres.url))
    try:
        serve_model(database, [standins("m")])
        key, key_id = add_key(database)
        unseen, _ = add_key(database, name="never used")
        gateway = start_gateway(database=database, database_url=throwaway_postgres.url, key_cache_s=1.0)
        client = gateway.sdk(key)
        assert chat(client).choices[0].message.content
        login = httpx.post(f"{gateway.url}/api/auth/login", json={"username": "alice", "password": "pw"})
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        before = httpx.get(f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {token}"})
        assert before.status_code == 200  # the login is used (and its user checked) before the outage

        throwaway_postgres.stop()
        time.sleep(2.5)  # every cached answer has expired: each would need the database now
        for _ in range(5):
            assert chat(client).choices[0].message.content
            assert "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True))
        models = httpx.get(f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {token}"})
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["m"]

        with pytest.raises(openai.APIStatusError) as refused:
            chat(gateway.sdk(unseen))
        assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"]
        assert refused.value.body["code"] == "credentials_unavailable"  # type: ignore[index]
        again = httpx.post(f"{gateway.url}/api/auth/login", json={"username": "alice", "password": "pw"})
        assert again.status_code == 503 and again.json()["error"]["code"] == "database_unavailable", again.text
        new_key = httpx.post(f"{gateway.url}/api/keys", json={"name": "during"},
                             headers={"authorization": f"Bearer {token}"})
        assert new_key.status_code == 503, new_key.text

        throwaway_postgres.start()
        with database.session() as session:
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=datetime.now(UTC)))
        revoked_at = time.monotonic()

        def refused_now() -> bool:
            try:
                chat(client)
            except openai.AuthenticationError:
                return True
            return False

        wait_for("the revoked key to be refused", refused_now, timeout=10)
        assert time.monotonic() - revoked_at < 5
        assert chat(gateway.sdk(unseen)).choices[0].message.content  # checked now that the database answers
    finally:
        database.close()
