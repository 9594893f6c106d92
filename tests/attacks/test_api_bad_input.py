"""Finding 8: a NUL byte in a JSON field gave a 500 on /api/auth/login (no credentials needed, ~237 log lines
each) and on /api/events, /api/usage, /api/keys; deeply nested JSON gave a 500 on the gateway. Now every
one is a 400 naming the field, and nothing is stored."""

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
from lmstack.state import ApiKey, Database

NESTED = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def client(db: Database, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(jwt_secret=SECRET, home=tmp_path, repo=None), database=db),
                    raise_server_exceptions=False) as test_client:
        yield test_client


def _bad(answer: Any, param: str | None) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


CASES = [  # (method, path, json body or raw body, query, the field named)
    ("POST", "/api/auth/login", {"username": "root\x00", "password": "x" * 12}, None, "username"),
    ("POST", "/api/auth/login", {"username": "root", "password": "pass\x00word-long"}, None, "password"),
    ("POST", "/api/auth/login", {"username": "root\ud800", "password": "x" * 12}, None, "username"),
    ("GET", "/api/events", None, {"object": "Deployment/a\x00"}, "object"),
    ("GET", "/api/usage", None, {"model": "m\x00"}, "model"),
    ("POST", "/api/keys", {"name": "app\x00"}, None, "name"),
    ("POST", "/api/keys", {"name": "app", "models": ["m", "\ud83d"]}, None, "models.1"),
    ("POST", "/api/keys", NESTED, None, None),
]


@pytest.mark.parametrize(("method", "path", "body", "query", "param"), CASES,
                         ids=[f"{c[0]} {c[1]} {c[4]}" for c in CASES])
def test_bad_text_and_nesting_are_a_400_naming_the_field(client: TestClient, db: Database, method: str, path: str,
                                                         body: Any, query: dict[str, str] | None,
                                                         param: str | None) -> None:
    token = add_user(db, "root", "admin")
    options: dict[str, Any] = {"params": query, "headers": {**bearer(token), "content-type": "application/json"}}
    if isinstance(body, str):
        options["content"] = body.encode()
    elif body is not None:
        import json
        options["content"] = json.dumps(body).encode()  # \u0000 and \ud800 as JSON escapes, as a client sends
    _bad(client.request(method, path, **options), param)
    with db.session() as session:
        assert session.query(ApiKey).count() == 0


def test_deeply_nested_json_on_the_gateway_is_a_400(client: TestClient, db: Database) -> None:
    add_user(db, "root", "admin")
    with db.session() as session:
        key = create_key(session, user="root", name="k").token
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        answer = client.post(path, content=NESTED.encode(), headers=bearer(key))
        assert answer.status_code == 400, answer.text
        assert "nested too deeply" in answer.json()["error"]["message"]
