"""POST /api/hooks/git: GitHub, Gitea and GitLab signatures (and a bearer secret) start a controller pass at
once; a missing or bad one gets 401 and nothing happens; a server without a secret or a controller answers
404 to a signed request. End to end on the test bed: a push to a bare remote and a signed webhook through a
live server make the new container Ready and the sync run Succeeded."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apiserver import SECRET, LiveServer
from fastapi.testclient import TestClient
from gitops import HOOK_SECRET, Remote, github_signature, replica_status, sync_runs, wait_for

from lmstack.api.app import create_app
from lmstack.api.inputs import MAX_BODY_BYTES
from lmstack.config import Settings
from lmstack.controller import Controller, PassResult, build_controller
from lmstack.state import Database

BODY = json.dumps({"ref": "refs/heads/main", "after": "b" * 40}).encode()


def _hmac(body: bytes, secret: str = HOOK_SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _controller(seen: list[str]) -> Controller:
    def run_pass(trigger: str) -> PassResult:
        seen.append(trigger)
        return PassResult(trigger, "unchanged", "a" * 40, "no changes", observed=True)

    return Controller(run_pass, poll_interval_s=3600, drift_interval_s=3600)


@pytest.fixture
def hooked(tmp_path: Path, db: Database) -> Iterator[tuple[TestClient, Controller, list[str]]]:
    seen: list[str] = []
    controller = _controller(seen)
    settings = Settings(jwt_secret=SECRET, home=tmp_path, repo=None, webhook_secret=HOOK_SECRET)
    with TestClient(create_app(settings, database=db, controller=controller)) as client:
        assert controller.wait_idle(passes=1, timeout_s=10)  # the pass at start
        yield client, controller, seen


@pytest.mark.parametrize(("headers", "signed_by"), [
    ({"X-Hub-Signature-256": "sha256=" + _hmac(BODY)}, "github"),
    ({"X-Hub-Signature-256": "sha256=" + _hmac(BODY).upper()}, "github"),
    ({"X-Gitea-Signature": _hmac(BODY)}, "gitea"),
    ({"X-Gitlab-Token": HOOK_SECRET}, "gitlab"),
    ({"Authorization": f"Bearer {HOOK_SECRET}"}, "bearer"),
])
def test_a_signed_request_starts_a_pass_at_once(hooked: Any, headers: dict[str, str], signed_by: str) -> None:
    client, controller, seen = hooked
    answer = client.post("/api/hooks/git", content=BODY, headers={**headers, "Content-Type": "application/json"})
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"accepted": True, "signedBy": signed_by, "message": "sync started"}
    assert controller.wait_idle(passes=2, timeout_s=10)
    assert seen == ["start", "webhook"]


@pytest.mark.parametrize("headers", [
    {},
    {"X-Hub-Signature-256": "sha256=" + _hmac(BODY, "wrong-secret")},
    {"X-Hub-Signature-256": "sha256=" + _hmac(BODY + b" ")},  # signed another body
    {"X-Hub-Signature-256": _hmac(BODY)},  # without "sha256="
    {"X-Hub-Signature-256": "sha256="},
    {"X-Gitea-Signature": _hmac(BODY, "wrong-secret")},
    {"X-Gitlab-Token": HOOK_SECRET + "x"},
    {"X-Gitlab-Token": "sécret".encode()},  # not ASCII
    {"Authorization": "Bearer wrong"},
    {"X-Hub-Signature": "sha1=" + hmac.new(HOOK_SECRET.encode(), BODY, hashlib.sha1).hexdigest()},  # SHA-1: no
])
def test_a_missing_or_bad_signature_gets_401_and_nothing_happens(hooked: Any, headers: dict[str, Any]) -> None:
    client, controller, seen = hooked
    answer = client.post("/api/hooks/git", content=BODY, headers=headers)
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"]["code"] == "invalid_signature"
    assert answer.headers["www-authenticate"] == "Bearer"
    assert controller.pokes == 0 and seen == ["start"]


def test_a_body_over_the_limit_gets_413_and_nothing_happens(hooked: Any) -> None:
    client, controller, _ = hooked
    body = b"x" * (MAX_BODY_BYTES + 1)
    answer = client.post("/api/hooks/git", content=body, headers={
        "X-Hub-Signature-256": "sha256=" + _hmac(body), "Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 413 and controller.pokes == 0


def test_without_a_secret_or_a_controller_a_signed_request_gets_404(tmp_path: Path, db: Database) -> None:
    signed = {"X-Hub-Signature-256": "sha256=" + _hmac(BODY)}
    seen: list[str] = []
    controller = _controller(seen)
    no_secret = Settings(jwt_secret=SECRET, home=tmp_path, repo=None, webhook_secret=None)
    with TestClient(create_app(no_secret, database=db, controller=controller)) as client:
        answer = client.post("/api/hooks/git", content=BODY, headers=signed)
        assert answer.status_code == 404 and "LMSTACK_WEBHOOK_SECRET" in answer.json()["error"]["message"]
        assert client.post("/api/hooks/git", content=BODY).status_code == 401  # unsigned: 401 all the same
    assert controller.pokes == 0
    with_secret = no_secret.model_copy(update={"webhook_secret": HOOK_SECRET})
    with TestClient(create_app(with_secret, database=db)) as client:
        answer = client.post("/api/hooks/git", content=BODY, headers=signed)
        assert answer.status_code == 404 and "no controller" in answer.json()["error"]["message"]


def test_the_webhook_is_in_the_api_document_with_its_answers() -> None:
    document = create_app(Settings(jwt_secret=SECRET, repo=None)).openapi()
    operation = document["paths"]["/api/hooks/git"]["post"]
    assert set(operation["responses"]) == {"202", "400", "401", "404", "413"}
    assert "X-Hub-Signature-256" in operation["description"]


# -- end to end on the bed ----------------------------------------------------------------------------------


def test_a_push_and_a_signed_webhook_make_the_new_container_ready(
        tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database, database_url: str) -> None:
    remote = Remote(tmp_path, clean_testbed, standin_image)
    first = remote.head
    settings = remote.settings(database_url, webhook_secret=HOOK_SECRET)  # polls hourly, no watcher below
    controller = build_controller(settings, db, watch=False)
    assert controller is not None
    with LiveServer(create_app(settings, database=db, controller=controller), settings) as server:
        wait_for("the first commit applied", lambda: sync_runs(db) == [("start", "succeeded", first)])
        sha = remote.push("chat", replicas=1)
        body = json.dumps({"ref": "refs/heads/main", "after": sha}).encode()
        url = f"{server.url}/api/hooks/git"

        bad = httpx.post(url, content=body, headers=github_signature(body, "not-the-secret"), timeout=10)
        assert bad.status_code == 401
        assert httpx.post(url, content=body, timeout=10).status_code == 401
        assert controller.pokes == 0 and sync_runs(db) == [("start", "succeeded", first)]

        good = httpx.post(url, content=body, headers=github_signature(body), timeout=10)
        assert good.status_code == 202, good.text
        wait_for("the push applied", lambda: sync_runs(db)[1:] == [("webhook", "succeeded", sha)])
        assert replica_status(db) == {"chat/0": "ready"} and set(remote.containers()) == {"chat/0"}
    assert sync_runs(db) == [("start", "succeeded", first), ("webhook", "succeeded", sha)]
