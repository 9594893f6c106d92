"""Drift repair with `lmstack serve`'s app and controller on the real test bed: a managed container removed by
hand (`docker rm -f`) is back within two drift intervals (plus its start), and the database (so `lmstack
status`, /api/deployments and the gateway) showed it missing in between; every usage row names the commit of
the replica that served it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from apiserver import SECRET, LiveServer, add_user, bearer
from gitops import Remote, wait_for
from replica_history import ReplicaHistory
from sqlalchemy import select

from lmstack.api.app import create_app
from lmstack.controller import build_controller
from lmstack.state import Database, Event, Replica, SyncRun, Usage

DRIFT_S = 2.0


@pytest.fixture
def remote(tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database) -> Remote:
    return Remote(tmp_path, clean_testbed, standin_image)


def _replica(db: Database) -> Replica | None:
    with db.session() as session:
        return session.scalars(select(Replica)).one_or_none()


def _rows(db: Database) -> list[Replica]:
    with db.session() as session:
        return list(session.scalars(select(Replica)))


def _runs(db: Database) -> list[SyncRun]:
    with db.session() as session:
        return list(session.scalars(select(SyncRun).order_by(SyncRun.id)))


def _usage_by_revision(db: Database) -> dict[str | None, int]:
    with db.session() as session:
        found: dict[str | None, int] = {}
        for row in session.scalars(select(Usage).where(Usage.model == "chat")):
            found[row.revision] = found.get(row.revision, 0) + row.requests
        return found


def test_a_removed_container_is_back_within_two_drift_intervals_and_usage_names_the_revision_that_served(
        remote: Remote, db: Database, database_url: str) -> None:
    settings = remote.settings(database_url, drift_interval_s=DRIFT_S, facts_interval_s=3600, jwt_secret=SECRET,
                               usage_flush_s=0.2, registry_refresh_s=0.2)
    controller = build_controller(settings, db, watch=False)
    assert controller is not None
    token = add_user(db, "root", "admin")

    def chat() -> bool:
        answer = httpx.post(f"{server.url}/v1/chat/completions", headers=bearer(token), timeout=30,
                            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        return answer.status_code == 200

    with ReplicaHistory(db) as history, \
            LiveServer(create_app(settings, database=db, controller=controller), settings) as server:
        first = remote.push("chat", replicas=1)
        controller.poke("webhook")
        wait_for("chat/0 Ready", lambda: [(r.status, r.revision) for r in _rows(db)] == [("ready", first)])
        wait_for("a request served", chat, timeout_s=30)
        wait_for("its usage written", lambda: _usage_by_revision(db).get(first, 0) >= 1, timeout_s=30)

        # Removed by hand: the next drift pass sees it gone, records it, and recreates it.
        before = _replica(db)
        assert before is not None and before.container_id is not None
        removed_at = datetime.now(UTC)
        remote.bed.docker(remote.containers()["chat/0"], "rm", "-f", before.container_id)
        wait_for("chat/0 Ready again in a new container",
                 lambda: (r := _replica(db)) is not None and r.status == "ready"
                 and r.container_id != before.container_id, timeout_s=60)
        after = [change for change in history.rows("chat", 0) if change.at >= removed_at]
        assert [change.status for change in after] == ["missing", "starting", "ready"], after
        missing, starting, ready = after
        assert missing.container_id == before.container_id and starting.container_id != before.container_id
        noticed_s = (missing.at - removed_at).total_seconds()
        created_s = (starting.at - removed_at).total_seconds()
        start_s = (ready.at - starting.at).total_seconds()
        print(f"drift repair: noticed after {noticed_s:.2f} s, new container recorded after {created_s:.2f} s, "
              f"Ready after {(ready.at - removed_at).total_seconds():.2f} s (its start {start_s:.2f} s); "
              f"drift interval {DRIFT_S:g} s")
        assert noticed_s <= 2 * DRIFT_S, noticed_s
        # The pass that noticed it repaired it: one drift sync run since, succeeded (the rest is the start). The
        # replica is recorded Ready a moment before its pass records its own end: wait for that.
        wait_for("the drift pass recorded as ended", lambda: all(
            run.status != "running" for run in _runs(db) if run.started_at >= removed_at), timeout_s=30)
        assert [(run.trigger, run.status) for run in _runs(db) if run.started_at >= removed_at] == [
            ("drift", "succeeded")]
        with db.session() as session:
            lost = session.scalars(select(Event).where(Event.reason == "ReplicaLost")).all()
        assert [event.message for event in lost] == [
            f"replica 0: container {before.container_id[:12]} is gone from {before.worker_name} (removed or never "
            "started)"]
        assert after[-1].crash_count == 0  # removed is drift, not a crash: no backoff

        # A new commit: requests served by the new replica are credited to the new revision.
        second = remote.push("chat", replicas=1, args=["--token-delay", "0"])
        controller.poke("webhook")
        # (A rollout may surge: a second row for a while, the new replica beside the old one.)
        wait_for("chat/0 alone and Ready at the new commit", lambda: [(r.status, r.revision) for r in _rows(db)]
                 == [("ready", second)])
        served = _usage_by_revision(db).get(first, 0)
        wait_for("a request served by the new replica", chat, timeout_s=30)
        wait_for("its usage written", lambda: _usage_by_revision(db).get(second, 0) >= 1, timeout_s=30)
        assert set(_usage_by_revision(db)) == {first, second} and _usage_by_revision(db)[first] == served
        rows = httpx.get(f"{server.url}/api/usage", headers=bearer(token)).json()["data"]
        assert {row["revision"] for row in rows if row["model"] == "chat"} == {first, second}
    assert len(remote.containers()) == 1  # no duplicate left by the repair or the rollout
