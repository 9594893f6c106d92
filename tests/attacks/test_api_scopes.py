"""Finding 7: a key restricted to one model read all of /api/* and /metrics, other models' engine addresses
included; an admin's model-restricted key could open every deployment's live logs and read every user's
usage. Now: keys are for /v1 and their own usage; the status API, /metrics and logs need a login or a key
with the scope; a key limited to models sees only those, anywhere; engine addresses are for admins only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from apiserver import SECRET, add_user, bearer
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from lmstack.api.app import create_app
from lmstack.api.services.keys import create_key
from lmstack.config import Settings
from lmstack.state import ApiKey, Database, Deployment, Event, Replica, Usage, Worker

STATUS_ROUTES = ["/api/workers", "/api/deployments", "/api/deployments/a", "/api/sync", "/api/events", "/api/plan"]


def _key(db: Database, user: str, *, models: list[str] | None = None, scopes: tuple[str, ...] = ()) -> str:
    with db.session() as session:
        created = create_key(session, user=user, name="k", models=models)
        # The scopes column written directly, so this file also runs against code before scopes existed.
        session.query(ApiKey).filter_by(id=created.record.id).update({"scopes": list(scopes)})
        return created.token


def _seed(db: Database) -> None:
    spec = {"backend": "vllm", "model": "m", "replicas": 1, "resources": {"gpus": 1}}
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with db.session() as session:
        session.add_all([
            Worker(name="gpu-a", host="gpu-a", facts={"gpus": []}, facts_at=datetime.now(UTC)),
            Deployment(name="a", served_name="a", spec=spec, spec_hash="h", conditions=[]),
            Deployment(name="b", served_name="b", spec=spec, spec_hash="h", conditions=[]),
            Replica(deployment_name="a", ordinal=0, worker_name="gpu-a", gpu_indices=[0], spec=spec, spec_hash="h",
                    status="ready", endpoint="http://10.0.0.1:8000", container_id="ca"),
            Replica(deployment_name="b", ordinal=0, worker_name="gpu-a", gpu_indices=[1], spec=spec, spec_hash="h",
                    status="ready", endpoint="http://10.0.0.1:8001", container_id="cb"),
            Event(object_kind="Deployment", object_name="a", reason="ReplicaReady",
                  message="replica 0 ready at http://10.0.0.1:8000"),
            Event(object_kind="Deployment", object_name="b", reason="ReplicaReady",
                  message="replica 0 ready at http://10.0.0.1:8001"),
        ])
    with db.session() as session:
        keys = {key.name: key.id for key in session.query(ApiKey)}
        session.add_all([Usage(api_key_id=key_id, model=model, hour=hour, requests=1)
                         for key_id in keys.values() for model in ("a", "b")])


@pytest.fixture
def client(db: Database, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(jwt_secret=SECRET, home=tmp_path, repo=None), database=db),
                    raise_server_exceptions=False) as test_client:
        yield test_client


def test_a_key_without_scopes_reaches_only_v1_and_its_own_usage(client: TestClient, db: Database) -> None:
    add_user(db, "viewer", "viewer")
    key = _key(db, "viewer")
    _seed(db)
    for path in [*STATUS_ROUTES, "/metrics"]:
        answer = client.get(path, headers=bearer(key))
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["error"]["code"] == "missing_scope"
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert client.get("/api/usage", headers=bearer(key)).status_code == 200


def test_a_model_restricted_key_sees_only_its_models_everywhere(client: TestClient, db: Database) -> None:
    add_user(db, "viewer", "viewer")
    key = _key(db, "viewer", models=["a"], scopes=("status", "metrics"))
    _seed(db)
    listed = client.get("/api/deployments", headers=bearer(key)).json()["deployments"]
    assert [d["name"] for d in listed] == ["a"]
    assert client.get("/api/deployments/b", headers=bearer(key)).status_code == 404
    detail = client.get("/api/deployments/a", headers=bearer(key)).json()
    assert [r["endpoint"] for r in detail["replicas"]] == [None]  # engine addresses: admins only
    workers = client.get("/api/workers", headers=bearer(key)).json()["workers"]
    assert workers[0]["replicas"] == ["a/0"]
    events = client.get("/api/events", headers=bearer(key)).json()["events"]
    assert [e["objectName"] for e in events] == ["a"] and "10.0.0.1" not in json.dumps(events)
    metrics = client.get("/metrics", headers=bearer(key)).text
    assert 'deployment="a"' in metrics and 'deployment="b"' not in metrics
    usage = client.get("/api/usage", headers=bearer(key)).json()["data"]
    assert {row["model"] for row in usage} == {"a"}


def test_an_admins_model_restricted_key_acts_as_no_more_than_its_user_and_models(client: TestClient,
                                                                                db: Database) -> None:
    add_user(db, "root", "admin")
    add_user(db, "other", "viewer")
    _key(db, "other")  # another user's usage rows
    key = _key(db, "root", models=["a"], scopes=("status", "logs"))
    _seed(db)
    usage = client.get("/api/usage", headers=bearer(key)).json()["data"]
    assert usage and {(row["user"], row["model"]) for row in usage} == {("root", "a")}
    detail = client.get("/api/deployments/a", headers=bearer(key)).json()
    assert [r["endpoint"] for r in detail["replicas"]] == ["http://10.0.0.1:8000"]  # an admin's key: shown
    with pytest.raises(WebSocketDisconnect) as refused, \
            client.websocket_connect("/api/deployments/b/logs", headers=bearer(key)) as ws:
        ws.receive_text()
    assert refused.value.code == 4404
    unscoped = _key(db, "root")
    with pytest.raises(WebSocketDisconnect) as refused, \
            client.websocket_connect("/api/deployments/a/logs", headers=bearer(unscoped)) as ws:
        ws.receive_text()
    assert refused.value.code == 4403


def test_viewers_do_not_see_engine_addresses(client: TestClient, db: Database) -> None:
    viewer = add_user(db, "viewer", "viewer")
    _seed(db)
    detail = client.get("/api/deployments/a", headers=bearer(viewer)).json()
    assert [r["endpoint"] for r in detail["replicas"]] == [None]
    events = client.get("/api/events", headers=bearer(viewer)).json()["events"]
    assert len(events) == 2 and "10.0.0.1" not in json.dumps(events)
