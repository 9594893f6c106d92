"""Safe rollouts on the real test bed, under load through the real gateway: a replica whose spec needs a restart
is replaced by surge (the new one Ready before the old one stops), every replica that stops is drained first
(no new requests, the ones in flight finish), and a new version that never becomes Ready is rolled back while
the old one serves on.

The load is streamed chat completions through the gateway (uvicorn in a thread, registry_refresh_s 0.1) to the
stand-in engine, whose streams take about half a second, so requests are in flight whenever a replica is
drained; the stand-in stops at once on SIGTERM, so a request left on a stopping container fails. Each test
asserts what a user of the endpoint sees: not one failed request, none slower than a normal one by far.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from test_apply import Fleet, _ids, _models
from test_gateway import Gateway, add_key, start_gateway, wait_until_routed

from lmstack.reconcile.apply import Applier, ApplyReport, Survey
from lmstack.reconcile.backoff import hold_back
from lmstack.reconcile.model import ActionKind, Plan
from lmstack.reconcile.status import fleet_status
from lmstack.state import Database, Deployment, Event

__all__ = ["start_gateway"]  # a fixture: imported for the tests below

pytestmark = pytest.mark.testbed

TOKEN_DELAY = "0.04"  # seconds between streamed words: a stream takes about half a second


def _manifest(name: str, *, image: str, replicas: int, args: list[str], placement: str = "{strategy: spread}",
              startup_timeout: str = "60s") -> str:
    return (f"apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n"
            f"  backend: vllm\n  model: test/{name}\n  image: {image}\n  replicas: {replicas}\n"
            f"  resources: {{gpus: 0}}\n  placement: {placement}\n  args: {json.dumps(args)}\n"
            f"  health: {{startupTimeout: {startup_timeout}}}\n  rollout: {{drainTimeout: 20s}}\n")


def _only(fleet: Fleet, name: str, message: str, **options: Any) -> None:
    """The fleet's manifests reduced to one deployment, committed."""
    for path in (fleet.repo / "manifests").glob("*.yaml"):
        if path.name not in ("workers.yaml",) and "kind: Deployment" in path.read_text():
            path.unlink()
    options.setdefault("image", fleet.image)
    (fleet.repo / "manifests" / f"{name}.yaml").write_text(_manifest(name, **options))
    fleet.commit(message)


def _head(fleet: Fleet) -> str:
    return subprocess.run(["git", "-C", str(fleet.repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def _apply_ok(fleet: Fleet) -> tuple[Survey, ApplyReport]:
    survey, report = fleet.apply()
    assert report is not None and report.ok, [r.message for r in report.failed] + [str(p) for p in report.problems]
    return survey, report


def _ready(fleet: Fleet) -> dict[str, list[str]]:
    """Ready replica -> its args, from the database (what the gateway routes to)."""
    return {name: list(row.spec["args"]) for name, row in fleet.replicas().items() if row.status == "ready"}


@dataclass
class Load:
    """Clients streaming chat completions through the gateway in a loop until stopped."""

    url: str
    key: str
    model: str
    clients: int = 4
    ok: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds) of each complete answer
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def wait_for_answers(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ok) < count:
            assert time.monotonic() < deadline, f"only {len(self.ok)} answers, failures: {self.failed[:3]}"
            time.sleep(0.05)

    def _loop(self) -> None:
        body = {"model": self.model, "stream": True, "messages": [{"role": "user", "content": "hello there"}]}
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    with client.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                                       headers=headers) as answer:
                        text = "".join(answer.iter_text())
                        status = answer.status_code
                except httpx.HTTPError as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                    continue
                # Complete: a 200 whose stream ends as the engine ends it (the last word, then [DONE]).
                if status != 200 or "tokens." not in text or not text.rstrip().endswith("data: [DONE]"):
                    self.failed.append(f"{status}: {text[-300:]}")
                else:
                    self.ok.append((started, time.monotonic() - started))

    def slowest(self) -> float:
        return max(seconds for _, seconds in self.ok)


@pytest.fixture
def fleet(tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database) -> Fleet:
    return Fleet(tmp_path, clean_testbed, standin_image, db)


@pytest.fixture
def load(start_gateway: Callable[..., Gateway], db: Database) -> Iterator[Callable[[str, int], Load]]:
    """A gateway on the test database and a Load against it for a model (once its replicas are routed)."""
    running: list[Load] = []

    def start(model: str, replicas: int) -> Load:
        gateway = start_gateway()
        key, _ = add_key(db)
        wait_until_routed(gateway, model, replicas)
        started = Load(gateway.url, key, model).__enter__()
        running.append(started)
        started.wait_for_answers(8)
        return started

    yield start
    for started in running:
        started.__exit__()


def test_an_args_change_of_a_one_replica_deployment_surges_with_no_failed_request(
        fleet: Fleet, load: Callable[[str, int], Load]) -> None:
    _only(fleet, "solo", "solo", replicas=1, args=["--token-delay", TOKEN_DELAY], placement="{workers: [node1]}")
    _apply_ok(fleet)
    traffic = load("solo", 1)

    _only(fleet, "solo", "faster", replicas=1, args=["--token-delay", "0.03"], placement="{workers: [node1]}")
    before = len(traffic.ok)
    survey, report = _apply_ok(fleet)
    [action] = survey.plan.changes
    assert (action.kind, action.replica_name, action.surge) == (ActionKind.RECREATE, "solo/0", 1)
    assert not survey.plan.downtime
    traffic.wait_for_answers(before + 8)  # answered by the new replica too
    traffic.__exit__()

    assert traffic.failed == []
    assert len(traffic.ok) - before >= 8
    assert traffic.slowest() < 3, traffic.slowest()  # about 0.5 s each; none waited on a stopping container
    assert _ready(fleet) == {"solo/1": ["--token-delay", "0.03"]}
    assert list(_ids(fleet.containers())) == ["solo/1"]  # the old container is gone, and nothing else is left
    [result] = report.results
    assert result.message.startswith("replaced by solo/1")
    _, report = _apply_ok(fleet)
    assert not report.results  # converged: ordinal 1 is simply the replica now


def test_a_replica_that_moves_to_another_worker_serves_until_its_replacement_is_ready(
        fleet: Fleet, load: Callable[[str, int], Load]) -> None:
    """A placement change moves the replica: the new one starts on node2 while the old one serves on node1,
    which is then drained and removed."""
    _only(fleet, "solo", "on node1", replicas=1, args=["--token-delay", TOKEN_DELAY], placement="{workers: [node1]}")
    _apply_ok(fleet)
    traffic = load("solo", 1)

    _only(fleet, "solo", "on node2", replicas=1, args=["--token-delay", TOKEN_DELAY], placement="{workers: [node2]}")
    before = len(traffic.ok)
    survey, report = _apply_ok(fleet)
    [action] = survey.plan.changes
    assert action.placement is not None and action.previous is not None
    assert (action.surge, action.previous.worker, action.placement.worker) == (1, "node1", "node2")
    assert [r.message.split(",")[0] for r in report.results] == ["replaced by solo/1"]
    traffic.wait_for_answers(before + 8)  # answered on node2 too
    traffic.__exit__()

    assert traffic.failed == []
    assert traffic.slowest() < 3, traffic.slowest()
    assert list(_ready(fleet)) == ["solo/1"] and fleet.replicas()["solo/1"].worker_name == "node2"
    running = {f"{c['deployment']}/{c['replica']}": host for host, cs in fleet.containers().items() for c in cs
               if c["deployment"]}
    assert running == {"solo/1": "node2"}  # the old container is gone from node1


def test_a_version_that_never_becomes_ready_is_rolled_back_while_the_old_one_serves(
        fleet: Fleet, load: Callable[[str, int], Load]) -> None:
    good = {"replicas": 1, "args": ["--token-delay", TOKEN_DELAY], "placement": "{workers: [node1]}"}
    _only(fleet, "solo", "good", **good)
    _apply_ok(fleet)
    for host in fleet.bed.hosts:
        fleet.bed.docker(host, "tag", fleet.image, "lmstack-standin:never-ready")
    traffic = load("solo", 1)

    _only(fleet, "solo", "a version that never answers", replicas=1, image="lmstack-standin:never-ready",
          args=["--startup-delay", "600"], placement="{workers: [node1]}", startup_timeout="4s")
    survey, report = fleet.apply()
    assert [a.surge for a in survey.plan.changes] == [1]
    assert report is not None and not report.ok
    [result] = report.failed
    assert "not ready after 4 s" in result.message and "replica 0 keeps serving the previous spec" in result.message
    assert _ready(fleet) == {"solo/0": ["--token-delay", TOKEN_DELAY]}
    assert list(_ids(fleet.containers())) == ["solo/0"]  # the new one is removed
    with fleet.database.session() as session:
        status = fleet_status(session, head=_head(fleet))
        [deployment] = status.deployments
        assert deployment.state == "Degraded" and "keeps serving the previous spec" in deployment.reason
        reasons = set(session.scalars(select(Event.reason).where(Event.object_name == "solo")))
        assert "RolloutFailed" in reasons

    # The failed version is not tried on every pass (each try costs its startupTimeout): like a crash loop it
    # waits 2 s, then 6 s, ..., while the old replica keeps serving. A pass before its time holds it back;
    # one after it tries once more (and fails again, waiting longer). Within a few passes one is held back.
    assert report.retry_at is not None
    for _ in range(4):
        held_survey, again = fleet.apply()
        assert again is not None and not again.ok
        if not again.results:
            break
        assert [r.action.surge for r in again.failed] == [1]  # tried again, after its retry time
    assert again.results == (), "no pass held the failed rollout back"
    assert [str(p).split(" until ")[0] for p in again.problems] == ["solo/0: backing off"], again.problems
    # What `lmstack plan` shows as held back, from the database alone.
    take, held = hold_back(fleet.database, held_survey.plan.changes, now=datetime.now(UTC))
    assert take == [] and [(h.deployment, h.replica) for h in held] == [("solo", 0)]
    assert list(_ids(fleet.containers())) == ["solo/0"]

    _only(fleet, "solo", "revert", **good)
    before = len(traffic.ok)
    survey, report = _apply_ok(fleet)
    assert not survey.plan.has_changes
    traffic.wait_for_answers(before + 4)
    traffic.__exit__()
    assert traffic.failed == []  # the old replica answered the whole time
    with fleet.database.session() as session:
        status = fleet_status(session, head=_head(fleet))
        assert status.sync == "Synced" and [d.state for d in status.deployments] == ["Synced"]
        row = session.scalars(select(Deployment)).one()
        assert row.revision == _head(fleet)


def test_a_two_replica_rollout_and_a_scale_down_under_load_fail_no_request(
        fleet: Fleet, load: Callable[[str, int], Load]) -> None:
    _only(fleet, "pair", "pair", replicas=2, args=["--token-delay", TOKEN_DELAY])
    _apply_ok(fleet)
    traffic = load("pair", 2)

    _only(fleet, "pair", "new args", replicas=2, args=["--token-delay", "0.03"])
    before = len(traffic.ok)
    survey, _ = _apply_ok(fleet)
    assert sorted((a.replica_name, a.surge) for a in survey.plan.changes) == [("pair/0", 2), ("pair/1", 3)]
    assert _ready(fleet) == {"pair/2": ["--token-delay", "0.03"], "pair/3": ["--token-delay", "0.03"]}
    rolled = len(traffic.ok) - before

    _only(fleet, "pair", "scale down", replicas=1, args=["--token-delay", "0.03"])
    before = len(traffic.ok)
    survey, _ = _apply_ok(fleet)
    assert [(a.kind, a.replica_name) for a in survey.plan.changes] == [(ActionKind.DELETE, "pair/3")]
    traffic.wait_for_answers(len(traffic.ok) + 4)
    traffic.__exit__()

    assert traffic.failed == []
    assert rolled >= 8 and len(traffic.ok) - before >= 4
    assert traffic.slowest() < 3, traffic.slowest()
    assert list(_ready(fleet)) == ["pair/2"] and list(_ids(fleet.containers())) == ["pair/2"]


def test_a_restart_in_place_whose_new_spec_fails_puts_the_previous_spec_back(fleet: Fleet) -> None:
    """When no room is left for a surge (a full GPU machine: here the surge is taken out of the plan, as the
    planner does when nothing fits), the replica is drained and stopped first; a new spec that then fails
    readiness is replaced by the spec it served, on the same place."""
    good = {"replicas": 1, "args": ["--token-delay", TOKEN_DELAY], "placement": "{workers: [node1]}"}
    _only(fleet, "solo", "good", **good)
    _apply_ok(fleet)
    first = fleet.replicas()["solo/0"]
    _only(fleet, "solo", "never ready", replicas=1, args=["--startup-delay", "600"],
          placement="{workers: [node1]}", startup_timeout="3s")

    with Applier(fleet.source(), fleet.database, ssh_key=fleet.bed.ssh_key,
                 known_hosts=fleet.bed.known_hosts) as applier:
        survey = applier.survey()
        [action] = survey.plan.changes
        in_place = replace(action, surge=None, placement=action.previous)
        report = applier.execute(replace(survey, plan=Plan((in_place,))))

    [result] = report.failed
    assert "not ready after 3 s" in result.message and "rolled back: replica 0 serves the previous spec" \
        in result.message, result.message
    row = fleet.replicas()["solo/0"]
    assert row.status == "ready" and row.spec["args"] == ["--token-delay", TOKEN_DELAY]
    assert row.revision == first.revision and row.spec_hash == first.spec_hash
    assert list(_ids(fleet.containers())) == ["solo/0"]
    assert _models(str(row.endpoint), row.engine_key) == ["solo"]
    with fleet.database.session() as session:
        [deployment] = fleet_status(session, head=_head(fleet)).deployments
        assert deployment.state == "Degraded" and "rolled back" in deployment.reason
