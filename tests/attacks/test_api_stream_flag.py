"""Finding 10: `"stream": 1` streamed from the engine but recorded 0 tokens (the gateway read it as not
streaming). `stream` must be a JSON boolean, and `stream_options` an object: else a 400 naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import SECRET, add_user, bearer
from fastapi.testclient import TestClient

from lmstack.api.app import create_app
from lmstack.api.services.keys import create_key
from lmstack.config import Settings
from lmstack.state import Database


@pytest.fixture
def client(db: Database, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(jwt_secret=SECRET, home=tmp_path, repo=None), database=db),
                    raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize(("extra", "param"), [
    ({"stream": 1}, "stream"), ({"stream": "true"}, "stream"), ({"stream": 0}, "stream"),
    ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
])
def test_stream_must_be_a_boolean(client: TestClient, db: Database, extra: dict[str, Any], param: str) -> None:
    add_user(db, "root", "admin")
    with db.session() as session:
        key = create_key(session, user="root", name="k").token
    answer = client.post("/v1/chat/completions", headers=bearer(key),
                         json={"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
