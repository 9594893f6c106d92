"""The read-only status API, /metrics, /healthz and /readyz, and live logs over the WebSocket.

Real PostgreSQL (rows inserted directly, as the reconciler writes them), a real uvicorn where the wire
matters, and for the logs a real apply on the multi-host test bed: the stand-in engine's output is read
from its container over SSH, and the SSH connection is gone once the client leaves.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apiserver import SECRET, LiveServer, add_user, bearer
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from starlette.websockets import WebSocketDisconnect
from testbed.fleet import workers_yaml, write_fleet

from lmstack.api.app import create_app
from lmstack.api.services import repo as repo_service
from lmstack.api.services.logs import End, LineReader, LogSession, LogTarget, _lines
from lmstack.api.services.metrics import Metrics
from lmstack.api.services.repo import NoRepository, RepoView
from lmstack.api.services.status import ReplicaLocation
from lmstack.cli.scaffold import scaffold
from lmstack.config import Settings
from lmstack.gitsource import SourceError, init_repository
from lmstack.reconcile.apply import apply_source
from lmstack.reconcile.records import condition
from lmstack.state import Database, Deployment, Event, Replica, SyncRun, Worker, open_database

GiB = 1024**3
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
PUBLIC_PATHS = {"/healthz", "/readyz", "/api/auth/login"}  # login: how a token is got in the first place


def _settings(home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"jwt_secret": SECRET, "home": home, "repo": None, "ssh_key": None,
                              "known_hosts": None, **overrides}
    return Settings(**values)


@pytest.fixture
def admin(db: Database) -> str:
    return add_user(db, "root", "admin")


@pytest.fixture
def viewer(db: Database) -> str:
    return add_user(db, "watcher", "viewer")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return _settings(tmp_path / "home")


@pytest.fixture
def client(settings: Settings, db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(settings, database=db)) as test_client:
        yield test_client


def _error(response: Any, status: int) -> dict[str, Any]:
    """The shared error shape (OpenAI's), checked; returns its inner object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


def _seed(db: Database) -> None:
    now = datetime.now(UTC)
    facts = {"gpus": [{"index": 0, "uuid": "GPU-0", "name": "NVIDIA H100", "memory_total": 80 * GiB,
                       "memory_used": 30 * GiB, "memory_unmanaged": 2 * GiB, "utilization": 37},
                      {"index": 1, "uuid": "GPU-1", "name": "NVIDIA H100", "memory_total": 80 * GiB,
                       "memory_used": None, "memory_unmanaged": 0, "utilization": None}],
             "docker_version": "27.1.1", "nvidia_runtime": True, "cpus": 64, "memory_total": 512 * GiB,
             "disk_free": 900 * GiB, "disk_total": 1800 * GiB}
    chat_spec = {"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen", "replicas": 3,
                 "image": "vllm/vllm-openai:v0.6.3", "resources": {"gpus": 1}, "env": {"TOKEN": "secret-value"}}
    with db.session() as session:
        session.add_all([
            Worker(name="gpu-a", host="host-a", labels={"rack": "r1"}, facts=facts, facts_at=now),
            Worker(name="gpu-b", host="host-b", facts=facts, facts_at=now - timedelta(hours=1),
                   facts_error="unreachable: gpu-b: cannot connect over SSH to root@10.0.0.2:22 (timed out)"),
            Worker(name="gpu-c", host="host-c"),
            Deployment(name="chat", served_name="qwen", spec=chat_spec, spec_hash="h-chat", revision="a" * 40,
                       last_attempted_revision="b" * 40,
                       conditions=[condition("Ready", False, "ReplicasNotReady", "2/3 replicas ready"),
                                   condition("Degraded", True, "ActionFailed", "replica 2: engine exited")]),
            Deployment(name="embed", served_name="embed", spec={"backend": "ollama", "model": "nomic", "replicas": 1},
                       spec_hash="h-embed", revision=None, last_attempted_revision=None, conditions=[]),
            Replica(deployment_name="chat", ordinal=0, worker_name="gpu-a", gpu_indices=[0], container_id="c0" * 32,
                    endpoint="http://10.0.0.1:8000", spec=chat_spec, spec_hash="h-chat", revision="a" * 40,
                    status="ready"),
            Replica(deployment_name="chat", ordinal=1, worker_name="gpu-b", gpu_indices=[1], container_id="c1" * 32,
                    endpoint="http://10.0.0.2:8000", spec=chat_spec, spec_hash="h-old", revision="9" * 40,
                    status="ready"),
            Replica(deployment_name="chat", ordinal=2, worker_name="gpu-a", gpu_indices=[1], container_id=None,
                    endpoint=None, spec=chat_spec, spec_hash="h-chat", status="failed", message="engine exited (1)"),
            Replica(deployment_name="embed", ordinal=0, worker_name="gpu-c", gpu_indices=[], container_id=None,
                    endpoint=None, spec={}, spec_hash="h-embed", status="pending"),
        ])


# -- workers, deployments -----------------------------------------------------------------------------------


def test_workers_are_ready_or_not_with_the_reason_and_a_facts_summary(client: TestClient, db: Database,
                                                                      admin: str) -> None:
    _seed(db)
    workers = {w["name"]: w for w in client.get("/api/workers", headers=bearer(admin)).json()["workers"]}
    assert list(workers) == ["gpu-a", "gpu-b", "gpu-c"]
    a = workers["gpu-a"]
    assert (a["status"], a["reason"], a["host"], a["labels"]) == ("Ready", None, "host-a", {"rack": "r1"})
    assert a["facts"]["dockerVersion"] == "27.1.1" and a["facts"]["nvidiaRuntime"] is True
    assert a["facts"]["gpus"][0] == {"index": 0, "name": "NVIDIA H100", "uuid": "GPU-0", "memoryTotal": 80 * GiB,
                                     "memoryUsed": 30 * GiB, "memoryUnmanaged": 2 * GiB, "utilization": 37}
    assert a["facts"]["gpus"][1]["utilization"] is None
    assert a["factsAt"] is not None and a["replicas"] == ["chat/0", "chat/2"]
    # An error from the last gathering: NotReady with it, the older facts still shown.
    b = workers["gpu-b"]
    assert b["status"] == "NotReady" and b["reason"].startswith("unreachable: gpu-b")
    assert b["facts"]["cpus"] == 64
    c = workers["gpu-c"]
    assert c["status"] == "NotReady" and "not gathered" in c["reason"] and c["facts"] is None


def test_deployments_list_and_one_with_its_replicas(client: TestClient, db: Database, viewer: str) -> None:
    _seed(db)
    answer = client.get("/api/deployments", headers=bearer(viewer))  # viewers may read status
    deployments = {d["name"]: d for d in answer.json()["deployments"]}
    chat = deployments["chat"]
    assert {k: chat[k] for k in ("servedName", "backend", "model", "replicasWanted", "replicasReady", "revision",
                                 "lastAttemptedRevision", "specHash")} == {
        "servedName": "qwen", "backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct", "replicasWanted": 3,
        "replicasReady": 2, "revision": "a" * 40, "lastAttemptedRevision": "b" * 40, "specHash": "h-chat"}
    assert [(c["type"], c["status"], c["reason"]) for c in chat["conditions"]] == [
        ("Ready", "False", "ReplicasNotReady"), ("Degraded", "True", "ActionFailed")]
    assert deployments["embed"]["replicasReady"] == 0 and deployments["embed"]["revision"] is None

    detail = client.get("/api/deployments/chat", headers=bearer(viewer)).json()
    assert detail["image"] == "vllm/vllm-openai:v0.6.3" and detail["gpusPerReplica"] == 1
    assert "secret-value" not in json.dumps(detail)  # the spec's env is not exposed
    replicas = detail["replicas"]
    assert [(r["name"], r["worker"], r["gpus"], r["status"]) for r in replicas] == [
        ("chat/0", "gpu-a", [0], "ready"), ("chat/1", "gpu-b", [1], "ready"), ("chat/2", "gpu-a", [1], "failed")]
    assert replicas[0]["endpoint"] is None and replicas[0]["containerId"] == "c0" * 32  # addresses: admins only
    assert replicas[1]["specHash"] == "h-old"  # not yet rolled to the current spec
    assert replicas[2]["message"] == "engine exited (1)" and replicas[2]["containerId"] is None

    error = _error(client.get("/api/deployments/nope", headers=bearer(viewer)), 404)
    assert error["code"] == "deployment_not_found" and "nope" in error["message"]
    _error(client.get("/api/deployments/Not_A_Name", headers=bearer(viewer)), 400)
    admin = add_user(db, "root", "admin")
    shown = client.get("/api/deployments/chat", headers=bearer(admin)).json()["replicas"]
    assert shown[0]["endpoint"] == "http://10.0.0.1:8000"


# -- events ------------------------------------------------------------------------------------------------------


def test_events_newest_first_filtered_by_object_and_type(client: TestClient, db: Database, admin: str) -> None:
    with db.session() as session:
        for i, (kind, name, type_) in enumerate([("Deployment", "chat", "Normal"), ("Worker", "gpu-a", "Normal"),
                                                 ("Deployment", "chat", "Warning"), ("Deployment", "embed", "Normal"),
                                                 ("Worker", "chat", "Normal")]):
            session.add(Event(type=type_, object_kind=kind, object_name=name, reason=f"R{i}", message=f"m{i}"))

    def reasons(query: str) -> list[str]:
        answer = client.get(f"/api/events{query}", headers=bearer(admin))
        assert answer.status_code == 200, answer.text
        return [event["reason"] for event in answer.json()["events"]]

    assert reasons("") == ["R4", "R3", "R2", "R1", "R0"]
    assert reasons("?limit=2") == ["R4", "R3"]
    assert reasons("?object=Deployment/chat") == ["R2", "R0"]
    assert reasons("?object=deployment/chat") == ["R2", "R0"]  # the kind in any case
    assert reasons("?object=chat") == ["R4", "R2", "R0"]  # a bare name: any kind
    assert reasons("?object=chat&type=Warning") == ["R2"]
    event = client.get("/api/events?limit=1", headers=bearer(admin)).json()["events"][0]
    assert set(event) == {"id", "at", "type", "objectKind", "objectName", "reason", "message", "syncRunId"}
    _error(client.get("/api/events?limit=0", headers=bearer(admin)), 400)


# -- sync and plan (a real git repository) -----------------------------------------------------------------------


def _commit(repo: Path, message: str) -> str:
    env = {**os.environ, **GIT_ENV}
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", message], check=True, env=env)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def _fleet_repo(root: Path) -> tuple[Path, str]:
    repo = root / "fleet"
    scaffold(repo)  # `lmstack init`'s example: workers gpu-a and gpu-b, deployment qwen-7b (2 x 1 GPU, 24Gi)
    return repo, init_repository(repo, "example fleet")


def _run(db: Database, revision: str | None, status: str, *, error: str | None = None) -> None:
    with db.session() as session:
        session.add(SyncRun(revision=revision, subject="s", source="fleet", trigger="cli", status=status,
                            plan={"summary": {"create": 2, "noop": 1}}, error=error,
                            finished_at=None if status == "running" else datetime.now(UTC)))


def test_sync_state_compares_the_last_applied_revision_with_the_repository(tmp_path: Path, db: Database,
                                                                          admin: str) -> None:
    repo, first = _fleet_repo(tmp_path)
    with TestClient(create_app(_settings(tmp_path / "home"), database=db)) as client:
        sync = client.get("/api/sync", headers=bearer(admin)).json()
        assert sync["state"] == "Unknown" and "LMSTACK_REPO" in sync["message"] and sync["head"] is None

    settings = _settings(tmp_path / "home", repo=str(repo), repo_refresh_s=0.3)
    with TestClient(create_app(settings, database=db)) as client:
        def sync_state() -> dict[str, Any]:
            answer = client.get("/api/sync", headers=bearer(admin))
            assert answer.status_code == 200, answer.text
            return dict(answer.json())

        sync = sync_state()
        assert sync["state"] == "OutOfSync" and "nothing was applied yet" in sync["message"]
        assert sync["head"]["revision"] == first and sync["head"]["subject"] == "example fleet"

        _run(db, first, "succeeded")
        sync = sync_state()
        assert (sync["state"], sync["revision"]) == ("Synced", first) and sync["syncedAt"] is not None

        (repo / "manifests" / "note.txt").write_text("changed\n")
        second = _commit(repo, "second")
        _run(db, second, "failed", error="chat/1: boom")
        # The repository is read at most every LMSTACK_REPO_REFRESH_S: the new commit shows after that.
        started = time.monotonic()
        while (sync := sync_state())["head"]["revision"] != second:
            assert time.monotonic() - started < 5, "the new commit was never seen"
            time.sleep(0.05)
        assert time.monotonic() - started > 0.1
        assert sync["state"] == "OutOfSync" and sync["revision"] == first
        assert "chat/1: boom" in sync["message"] and second[:12] in sync["message"]
        assert [(r["revision"], r["status"]) for r in sync["runs"]] == [(second, "failed"), (first, "succeeded")]
        assert sync["runs"][0]["summary"] == {"create": 2, "noop": 1} and sync["runs"][0]["error"] == "chat/1: boom"
        assert len(client.get("/api/sync?limit=1", headers=bearer(admin)).json()["runs"]) == 1

    with TestClient(create_app(_settings(tmp_path / "home", repo=str(tmp_path / "missing")), database=db)) as client:
        sync = client.get("/api/sync", headers=bearer(admin)).json()
        assert sync["state"] == "Unknown" and "cannot read the repository" in sync["message"]
        assert sync["revision"] == first  # what was applied is still known


def test_the_repository_is_read_once_per_refresh_time_and_parsed_once_per_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, first = _fleet_repo(tmp_path)
    remote = f"file://{repo}"  # a URL: every read is a fetch into the server's cache
    now = [0.0]
    view = RepoView(_settings(tmp_path / "home", repo=remote), max_age_s=5, clock=lambda: now[0])
    parses: list[str] = []
    real_parse = repo_service.parse_snapshot

    def counted(snapshot: Any, **options: Any) -> Any:
        parses.append(snapshot.revision.sha)
        return real_parse(snapshot, **options)

    monkeypatch.setattr(repo_service, "parse_snapshot", counted)
    with ThreadPoolExecutor(16) as pool:  # a burst of requests: one fetch, one parse
        heads = list(pool.map(lambda _: view.source().revision.sha, range(32)))  # type: ignore[union-attr]
    assert set(heads) == {first} and view.reads == 1 and parses == [first]

    (repo / "manifests" / "note.txt").write_text("changed\n")
    second = _commit(repo, "second")
    assert view.head().revision.sha == first  # type: ignore[union-attr]  # within the refresh time
    now[0] = 5.0
    assert view.source().revision.sha == second and view.reads == 2  # type: ignore[union-attr]
    now[0] = 10.0
    assert view.source().revision.sha == second and view.reads == 3  # type: ignore[union-attr]
    assert parses == [first, second]  # the same commit read again is not parsed again

    gone = RepoView(_settings(tmp_path / "home", repo=f"file://{tmp_path}/missing"), max_age_s=5,
                    clock=lambda: now[0])
    for _ in range(3):  # a failing remote is not retried on every request either
        with pytest.raises(SourceError):
            gone.head()
    assert gone.reads == 1
    with pytest.raises(NoRepository):
        RepoView(_settings(tmp_path / "home"), max_age_s=5).source()


def test_plan_from_the_repository_against_the_recorded_state(tmp_path: Path, db: Database, admin: str) -> None:
    repo, sha = _fleet_repo(tmp_path)
    with TestClient(create_app(_settings(tmp_path / "home"), database=db)) as client:
        error = _error(client.get("/api/plan", headers=bearer(admin)), 503)
        assert "LMSTACK_REPO" in error["message"]
    with TestClient(create_app(_settings(tmp_path / "home", repo=str(tmp_path / "missing")), database=db)) as client:
        error = _error(client.get("/api/plan", headers=bearer(admin)), 503)
        assert error["code"] == "repository_unavailable" and "missing" in error["message"]

    with TestClient(create_app(_settings(tmp_path / "home", repo=str(repo), repo_refresh_s=0.2),
                               database=db)) as client:
        plan = client.get("/api/plan", headers=bearer(admin)).json()
        assert plan["source"]["revision"] == sha
        # No facts recorded yet: nothing can be placed, and the plan says why.
        assert [(u["deployment"], u["replica"]) for u in plan["unplaceable"]] == [("qwen-7b", 0), ("qwen-7b", 1)]
        assert plan["hasChanges"] is True and plan["summary"]["unplaceable"] == 2

        # Facts in the database (as `lmstack facts` stores them): both replicas are placed.
        gpu = {"index": 0, "memory_total": 80 * GiB, "memory_unmanaged": 0, "name": "H100"}
        with db.session() as session:
            session.add_all([Worker(name=n, host=n, facts={"gpus": [gpu]}, facts_at=datetime.now(UTC))
                             for n in ("gpu-a", "gpu-b")])
        plan = client.get("/api/plan", headers=bearer(admin)).json()
        assert plan["unplaceable"] == []
        assert sorted((a["kind"], a["replica"], a["placement"]["worker"]) for a in plan["actions"]) == [
            ("create", 0, "gpu-a"), ("create", 1, "gpu-b")]
        assert plan["actions"][0]["specHash"] and plan["summary"]["create"] == 2

        # A commit with invalid manifests: 422 listing every error, with file and line.
        deployment = repo / "manifests" / "deployments" / "qwen-7b.yaml"
        deployment.write_text(deployment.read_text().replace("replicas:", "replica:"))
        (repo / "manifests" / "workers.yaml").write_text(
            (repo / "manifests" / "workers.yaml").read_text().replace("host: gpu-b", "host: gpu-z"))
        _commit(repo, "broken")
        time.sleep(0.25)  # the repository is read again once LMSTACK_REPO_REFRESH_S has passed
        error = _error(client.get("/api/plan", headers=bearer(admin)), 422)
        assert error["code"] == "invalid_manifests"
        problems = {(p["file"], p["path"]) for p in error["errors"]}
        assert ("manifests/deployments/qwen-7b.yaml", "spec.replica") in problems
        assert ("manifests/workers.yaml", "spec.host") in problems
        assert all(p["line"] > 0 for p in error["errors"])


# -- auth on every route, health ------------------------------------------------------------------------------


def _routes(app: Any) -> list[tuple[str, set[str], Any]]:
    """(path, methods, route) of every route, through included routers (FastAPI >= 0.16x nests them)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return [(r.path, set(getattr(r, "methods", None) or ()), r) for r in app.routes]
    return [(c.path, set(c.methods or ()), c.original_route) for c in iter_route_contexts(app.routes)]


def test_every_route_but_health_and_login_rejects_a_request_without_credentials(
        client: TestClient, admin: str) -> None:
    from fastapi.routing import APIWebSocketRoute

    checked = []
    for path, methods, route in _routes(client.app):
        if path in PUBLIC_PATHS:
            continue
        concrete = path.replace("{name}", "chat").replace("{model:path}", "m").replace("{key_id}", "1")
        assert "{" not in concrete, f"fill in the path parameter of {path} in this test"
        if isinstance(route, APIWebSocketRoute):
            with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(concrete) as ws:
                ws.receive_text()
            assert refused.value.code == 4401, path
            checked.append(f"WS {path}")
            continue
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            for headers in ({}, bearer("not-a-token"), bearer("lmsk_" + "x" * 43), {"Authorization": "Basic eDp5"}):
                response = client.request(method, concrete, headers=headers, json={})
                error = _error(response, 401)
                assert response.headers.get("www-authenticate") == "Bearer", (method, path)
                assert error["type"] == "authentication_error"
            checked.append(f"{method} {path}")
    mine = {"GET /api/workers", "GET /api/deployments", "GET /api/deployments/{name}", "GET /api/sync",
            "GET /api/events", "GET /api/plan", "GET /metrics", "WS /api/deployments/{name}/logs",
            "GET /openapi.json"}
    assert mine <= set(checked), sorted(mine - set(checked))


def test_health_needs_no_credentials(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "database": "ok"}


class TcpProxy:
    """127.0.0.1:port forwarding to PostgreSQL, that can stop answering (`hang`) or go away (`refuse`)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "forward"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.sockets.append(client)
                if self.mode != "forward":
                    continue  # accepted, never answered
                upstream = socket.create_connection(self.target)
                self.sockets.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def _drop_all(self) -> None:
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.sockets.clear()

    def hang(self) -> None:
        self.mode = "hang"
        self._drop_all()

    def refuse(self) -> None:
        self.mode = "refuse"
        self.listener.close()
        self._drop_all()


def test_readyz_answers_503_quickly_when_the_database_hangs_or_is_gone(tmp_path: Path, database_url: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    settings = _settings(tmp_path / "home", database_url=url.set(port=proxy.port).render_as_string(False))
    database = open_database(settings, migrate=False)
    try:
        with TestClient(create_app(settings, database=database)) as client:
            assert client.get("/readyz").status_code == 200
            proxy.hang()  # connections cut, new ones accepted but never answered
            started = time.monotonic()
            error = _error(client.get("/readyz"), 503)
            assert time.monotonic() - started < 3.0  # not libpq's 10 s connect timeout
            assert error["code"] == "database_unavailable"
            assert "127.0.0.1" not in error["message"]  # no details for anonymous callers
            assert client.get("/healthz").status_code == 200  # alive all the same
            proxy.refuse()
            _error(client.get("/readyz"), 503)
    finally:
        proxy.refuse()
        database.close()


# -- metrics ------------------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_gateway_traffic_and_read_replicas_from_the_database(client: TestClient, db: Database,
                                                                        admin: str) -> None:
    _seed(db)
    metrics: Metrics = client.app.state.lmstack.metrics  # type: ignore[attr-defined]
    metrics.observe_request("qwen", 200, 0.8, 0.05)
    metrics.observe_request("qwen", 200, 1.6, 0.12)
    metrics.observe_request("qwen", 502, 0.01)
    metrics.add_tokens("qwen", 120, 30)
    metrics.upstream_failed("qwen", "connect")
    metrics.usage_dropped(3)

    answer = client.get("/metrics", headers=bearer(admin))
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = _samples(answer.text)
    assert samples[("lmstack_requests_total", (("model", "qwen"), ("status", "200")))] == 2
    assert samples[("lmstack_requests_total", (("model", "qwen"), ("status", "502")))] == 1
    assert samples[("lmstack_request_duration_seconds_count", (("model", "qwen"),))] == 3
    assert samples[("lmstack_request_duration_seconds_bucket", (("le", "1.0"), ("model", "qwen")))] == 2
    assert samples[("lmstack_time_to_first_token_seconds_count", (("model", "qwen"),))] == 2
    assert samples[("lmstack_tokens_total", (("kind", "prompt"), ("model", "qwen")))] == 120
    assert samples[("lmstack_tokens_total", (("kind", "completion"), ("model", "qwen")))] == 30
    assert samples[("lmstack_upstream_failures_total", (("model", "qwen"), ("reason", "connect")))] == 1
    assert samples[("lmstack_usage_records_dropped_total", ())] == 3
    assert samples[("lmstack_database_up", ())] == 1
    replicas = {labels: value for (name, labels), value in samples.items() if name == "lmstack_replicas"}
    assert replicas[(("deployment", "chat"), ("state", "ready"))] == 2
    assert replicas[(("deployment", "chat"), ("state", "failed"))] == 1
    assert replicas[(("deployment", "chat"), ("state", "starting"))] == 0  # zeros too: alerts see the series
    assert replicas[(("deployment", "embed"), ("state", "pending"))] == 1
    assert samples[("lmstack_deployment_replicas_wanted", (("deployment", "chat"),))] == 3

    # Read at scrape time: a change in the database shows on the next scrape.
    with db.session() as session:
        session.query(Replica).filter_by(deployment_name="chat", ordinal=2).update({"status": "ready"})
    samples = _samples(client.get("/metrics", headers=bearer(admin)).text)
    assert samples[("lmstack_replicas", (("deployment", "chat"), ("state", "ready")))] == 3


def test_a_scrape_without_the_database_still_answers() -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    try:
        samples = _samples(Metrics().exposition(database=Database(engine)).decode())
    finally:
        engine.dispose()
    assert samples[("lmstack_database_up", ())] == 0
    assert not any(name == "lmstack_replicas" for name, _ in samples)
    assert ("lmstack_build_info", (("version", __import__("lmstack").__version__),)) in samples


# -- logs: refusals, line splitting, the reader thread --------------------------------------------------------


def _refusal(client: TestClient, path: str, **headers: str) -> tuple[int, str]:
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(path, headers=headers) as ws:
        ws.receive_text()  # accepted, then closed with the code: nothing is sent before the checks pass
    return refused.value.code, refused.value.reason


def test_logs_are_refused_before_the_handshake_with_a_code_and_a_reason(client: TestClient, db: Database,
                                                                       admin: str, viewer: str) -> None:
    _seed(db)
    assert _refusal(client, "/api/deployments/chat/logs")[0] == 4401
    assert _refusal(client, "/api/deployments/chat/logs?token=forged")[0] == 4401
    code, reason = _refusal(client, f"/api/deployments/chat/logs?token={viewer}")
    assert code == 4403 and "admin" in reason
    assert _refusal(client, f"/api/deployments/nope/logs?token={admin}") == (4404, "no deployment 'nope'")
    assert _refusal(client, f"/api/deployments/chat/logs?replica=7&token={admin}")[0] == 4404
    code, reason = _refusal(client, f"/api/deployments/chat/logs?replica=2&token={admin}")
    assert code == 4404 and "no container" in reason
    # The Authorization header works too (clients that can set it).
    assert _refusal(client, "/api/deployments/nope/logs", authorization=f"Bearer {admin}")[0] == 4404
    # Found, but the server has no repository to find the worker's address in.
    code, reason = _refusal(client, f"/api/deployments/chat/logs?replica=0&token={admin}")
    assert code == 4503 and "LMSTACK_REPO" in reason and len(reason.encode()) <= 123


def test_log_chunks_become_lines() -> None:
    chunks = [b"one\ntw", b"o\r\n", b"", b"three\nfour", b"\n\xff\xfe\n", b"tail without newline"]
    assert list(_lines(iter(chunks))) == ["one", "two", "three", "four", "\ufffd\ufffd", "tail without newline"]
    long = list(_lines(iter([b"x" * 40_000 + b"\n"])))
    assert [len(piece) for piece in long] == [16_384, 16_384, 7_232]


class _BlockingStream:
    """A log stream whose reads block until a chunk is fed; close() wakes a blocked read (as Docker's)."""

    def __init__(self) -> None:
        self.chunks: queue.Queue[bytes | None] = queue.Queue()
        self.closed = threading.Event()

    def __iter__(self) -> _BlockingStream:
        return self

    def __next__(self) -> bytes:
        chunk = self.chunks.get()
        if chunk is None or self.closed.is_set():
            raise StopIteration
        return chunk

    def close(self) -> None:
        self.closed.set()
        self.chunks.put(None)


class _Pool:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _session(stream: _BlockingStream, pool: _Pool) -> LogSession:
    target = LogTarget(replica=ReplicaLocation("chat", 0, "gpu-a", "c0"), container_id="c0", docker_url="ssh://x")
    return LogSession(pool, stream, target)  # type: ignore[arg-type]


def test_the_reader_thread_hands_over_lines_and_ends_when_the_session_is_closed() -> None:
    import asyncio

    async def scenario() -> None:
        stream, pool = _BlockingStream(), _Pool()
        session = _session(stream, pool)
        reader = LineReader(session, loop=asyncio.get_running_loop())
        reader.start()
        stream.chunks.put(b"hello\nwor")
        stream.chunks.put(b"ld\n")
        assert [await asyncio.wait_for(reader.next(), 5) for _ in range(2)] == ["hello", "world"]
        reader.sent()
        reader.sent()
        # The client leaves while the thread is blocked reading: closing wakes it and it ends.
        await asyncio.to_thread(session.close)
        assert await asyncio.to_thread(reader.join, 5)
        assert stream.closed.is_set() and pool.closed

        stream, pool = _BlockingStream(), _Pool()
        reader = LineReader(_session(stream, pool), loop=asyncio.get_running_loop())
        reader.start()
        stream.chunks.put(b"last words")
        stream.chunks.put(None)  # the container stopped
        assert await asyncio.wait_for(reader.next(), 5) == "last words"
        assert await asyncio.wait_for(reader.next(), 5) == End()

    asyncio.run(scenario())


def test_a_refusal_over_a_real_server_carries_its_code_and_reason(settings: Settings, db: Database) -> None:
    """What a client on the wire (a browser, the dashboard) sees: the close code and reason, not a bare 403."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with LiveServer(create_app(settings, database=db)) as server, pytest.raises(ConnectionClosed) as refused, \
            connect(f"{server.ws_url}/api/deployments/chat/logs", open_timeout=5) as ws:
        ws.recv(timeout=5)
    assert refused.value.rcvd is not None
    assert refused.value.rcvd.code == 4401 and "missing credentials" in refused.value.rcvd.reason


# -- logs of a real replica on the test bed ----------------------------------------------------------------------


def _bed_fleet(root: Path, bed: Any, image: str) -> Path:
    chat = ("apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: chat}\nspec:\n  backend: vllm\n"
            f"  model: test/chat\n  image: {image}\n  replicas: 1\n  resources: {{gpus: 0}}\n"
            "  placement: {workers: [node2]}\n  health: {startupTimeout: 60s}\n")
    return write_fleet(root / "fleet", bed, {"chat.yaml": chat},
                       workers=workers_yaml(bed.hosts, model_cache=lambda host: root / "models" / host.name),
                       message="one deployment")


def _our_ssh_connections(address: str) -> int:
    """This process's established TCP connections to the host's sshd (paramiko's, i.e. Docker over SSH)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", "dst", f"{address}:22"], capture_output=True,
                         text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if f"pid={os.getpid()}," in line)


def _recv_until(ws: Any, needle: str, timeout_s: float = 20) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines.append(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if needle in lines[-1]:
            return lines
    raise AssertionError(f"{needle!r} not in {lines}")


def test_status_and_live_logs_of_a_replica_applied_on_the_test_bed(tmp_path: Path, clean_testbed: Any,
                                                                   standin_image: str, db: Database) -> None:
    from websockets.sync.client import connect

    bed = clean_testbed
    repo = _bed_fleet(tmp_path, bed, standin_image)
    settings = _settings(tmp_path / "home", repo=str(repo), ssh_key=bed.ssh_key, known_hosts=bed.known_hosts,
                         mount_roots=[tmp_path / "models"])  # the workers' model caches (_bed_fleet)
    from lmstack.gitsource import load_source
    source = load_source(repo=str(repo), ref="HEAD", directory=None, settings=settings)
    _, report = apply_source(source, db, ssh_key=bed.ssh_key, known_hosts=bed.known_hosts)
    assert report is not None and report.ok, [r.message for r in report.failed] if report else None
    token = add_user(db, "root", "admin")
    node2 = bed.host("node2").address

    with LiveServer(create_app(settings, database=db)) as server:
        import httpx
        api = httpx.Client(base_url=server.url, headers=bearer(token), timeout=30)
        chat = api.get("/api/deployments/chat").json()
        assert (chat["replicasWanted"], chat["replicasReady"]) == (1, 1)
        replica = chat["replicas"][0]
        assert (replica["worker"], replica["status"]) == ("node2", "ready") and replica["containerId"]
        assert replica["endpoint"].startswith(f"http://{node2}:")
        workers = {w["name"]: w for w in api.get("/api/workers").json()["workers"]}
        assert workers["node2"]["status"] == "Ready" and workers["node2"]["replicas"] == ["chat/0"]
        assert api.get("/api/sync").json()["state"] == "Synced"
        plan = api.get("/api/plan").json()
        assert plan["hasChanges"] is False and [a["kind"] for a in plan["actions"]] == ["noop"]

        assert _our_ssh_connections(node2) == 0
        marker = uuid.uuid4().hex
        with connect(f"{server.ws_url}/api/deployments/chat/logs?replica=0&tail=100&token={token}",
                     open_timeout=20) as ws:
            history = _recv_until(ws, "standin: listening on")  # printed at start, within the last 100 lines
            assert all("\n" not in line for line in history)
            # Followed: a request to the engine now shows up as it is logged.
            # Without the engine's key it answers 401, and logs the request all the same.
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(f"{replica['endpoint']}/v1/models?marker={marker}", timeout=10).close()
            _recv_until(ws, marker)
            assert _our_ssh_connections(node2) == 1
        # The client left: the Docker log stream and its SSH connection are closed.
        deadline = time.monotonic() + 10
        while _our_ssh_connections(node2) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _our_ssh_connections(node2) == 0
        deadline = time.monotonic() + 5
        while [t for t in threading.enumerate() if t.name.startswith("logs chat/")] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("logs chat/")]

        # The container stops while someone watches: the stream ends with a normal close, and is cleaned up.
        from websockets.exceptions import ConnectionClosedOK
        with connect(f"{server.ws_url}/api/deployments/chat/logs?tail=1&token={token}", open_timeout=20) as ws:
            ws.recv(timeout=10)
            bed.docker("node2", "stop", "-t", "5", replica["containerId"])
            with pytest.raises(ConnectionClosedOK):
                while True:
                    ws.recv(timeout=15)
            assert ws.close_code == 1000 and "ended" in (ws.close_reason or "")
        deadline = time.monotonic() + 10
        while _our_ssh_connections(node2) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _our_ssh_connections(node2) == 0
        api.close()


def test_addresses_are_blanked_but_the_sentence_around_them_is_kept() -> None:
    from lmstack.api.services.status import HIDDEN, View

    hidden = View(addresses=False)
    said = hidden.text("replica 0 ready at http://10.0.0.5:8000: new replica")
    assert said == f"replica 0 ready at {HIDDEN}: new replica"
    assert hidden.text("no answer from 10.0.0.5:8000.") == f"no answer from {HIDDEN}."
    assert hidden.text("see ssh://root@gpu-a:22/x, then retry") == f"see {HIDDEN}, then retry"
    assert View().text("at http://10.0.0.5:8000: ok") == "at http://10.0.0.5:8000: ok"
