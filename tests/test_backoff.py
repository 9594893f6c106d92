"""Crash-loop backoff (lmstack/reconcile/backoff.py): a replica whose engine keeps exiting is recreated after
2 s, 6 s, 18 s, ... (at most 5 min), its deployment is Degraded with the exit code and the last log lines
(secrets blanked) in `lmstack status` and /api/deployments, and a commit that changes its spec is tried at
once, whatever the backoff. On the real test bed, with the controller running passes as `lmstack serve` does.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from gitops import Remote, git, wait_for
from replica_history import ReplicaHistory
from sqlalchemy import select

from lmstack.api.services.status import get_deployment, list_deployments
from lmstack.controller import build_controller
from lmstack.reconcile.backoff import CAP_S, Held, delay_s, next_count
from lmstack.reconcile.status import fleet_status
from lmstack.state import Database, Event, Replica, SyncRun

CRASH_IMAGE = "lmstack-crash:test"
SECRET = "hf_token_that_must_never_show_0123456789"
# The stand-in image with another entrypoint: prints its secrets (as a careless engine might), a last line,
# and exits 3, whatever the engine command line the backend gives it.
CRASH_SCRIPT = ("import os, sys; print('loading with key', os.environ.get('VLLM_API_KEY'), 'token', "
                "os.environ.get('HF_TOKEN'), flush=True); print('fatal: stand-in engine crashed', flush=True); "
                "sys.exit(3)")


# -- the rule -----------------------------------------------------------------------------------------------


def test_the_delays_grow_2_6_18_and_stop_at_5_minutes() -> None:
    assert [delay_s(n) for n in range(1, 9)] == [2, 6, 18, 54, 162, CAP_S, CAP_S, CAP_S] and CAP_S == 300


def test_the_count_starts_again_for_a_new_spec_or_after_a_container_ran_10_minutes() -> None:
    assert next_count(0, same_spec=True) == 1
    assert next_count(4, same_spec=True, ran_s=30) == 5  # up briefly, crashed again: still a loop
    assert next_count(4, same_spec=False) == 1  # a commit changed the spec: a new start
    assert next_count(4, same_spec=True, ran_s=600) == 1  # ran 10 minutes: it was healthy


def test_a_held_action_says_until_when_in_utc_and_which_attempt_comes() -> None:
    held = Held("chat", 0, datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC), 4)
    assert held.reason == "backing off until 12:00:05 UTC (attempt 4)"


# -- on the bed -----------------------------------------------------------------------------------------------


@pytest.fixture
def remote(tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database) -> Remote:
    bed = clean_testbed
    # The crashing image, made from the stand-in on node1 (no registry): a container committed with a new
    # entrypoint.
    if bed.docker("node1", "image", "inspect", CRASH_IMAGE, check=False).returncode != 0:
        entrypoint = json.dumps(["/usr/bin/python3", "-c", CRASH_SCRIPT])
        bed.docker("node1", "create", "--name", "lmstack-crash-base", standin_image)
        bed.docker("node1", "commit", "--change", f"ENTRYPOINT {entrypoint}", "lmstack-crash-base", CRASH_IMAGE)
        bed.docker("node1", "rm", "lmstack-crash-base")
    return Remote(tmp_path, bed, standin_image)


def _push(remote: Remote, *, image: str, message: str) -> str:
    (remote.work / "manifests" / "chat.yaml").write_text(
        "apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: chat}\nspec:\n"
        f"  backend: vllm\n  model: test/chat\n  image: {image}\n  replicas: 1\n  resources: {{gpus: 0}}\n"
        "  placement: {workers: [node1]}\n  env: {HF_TOKEN: {fromEnv: LMSTACK_SECRET_HF}}\n"
        "  health: {startupTimeout: 60s}\n")
    git("add", "-A", cwd=remote.work)
    git("commit", "-qm", message, cwd=remote.work)
    git("push", "-q", "origin", "main", cwd=remote.work)
    return remote.head


def test_a_crash_looping_engine_backs_off_2_6_18_s_is_degraded_with_its_exit_code_and_log_and_a_fix_runs_at_once(
        remote: Remote, db: Database, database_url: str) -> None:
    settings = remote.settings(database_url, drift_interval_s=1, facts_interval_s=3600)
    controller = build_controller(settings, db, watch=False, environ={"LMSTACK_SECRET_HF": SECRET})
    assert controller is not None
    with ReplicaHistory(db) as history:
        _push(remote, image=CRASH_IMAGE, message="chat: an engine that exits 3")
        controller.start()
        try:
            failures = wait_for("three failures in a row", lambda: (f := history.failures("chat", 0))[2:] and f,
                                timeout_s=180)
            # The recorded retry-after times: 2 s, then 6 s, then 18 s after each failure.
            assert [f.crash_count for f in failures[:3]] == [1, 2, 3]
            # Each with the engine's exit code, also when Docker had restarted the container (its restart policy)
            # before the pass looked: Docker resets a running container's exit code to 0.
            assert [f.crash_exit_code for f in failures[:3]] == [3, 3, 3]
            assert [(f.retry_after - f.crashed_at).total_seconds() for f in failures[:3]  # type: ignore[operator]
                    ] == [2.0, 6.0, 18.0]
            # No attempt started before the backoff allowed it: each new container after the last retry-after.
            attempts = history.attempts("chat", 0)
            assert len(attempts) >= 3
            for failure, attempt in zip(failures[:2], attempts[1:3], strict=True):
                assert failure.retry_after is not None and attempt.at >= failure.retry_after, (failure, attempt)

            # What a user sees while it backs off (18 s now): Degraded, with the exit code and the last line.
            third = failures[2]
            assert third.retry_after is not None and datetime.now(UTC) < third.retry_after
            with db.session() as session:
                [status] = fleet_status(session, head=remote.head).deployments
                [listed] = list_deployments(session=session).deployments
                detail = get_deployment(session=session, name="chat")
                row = session.scalars(select(Replica)).one()
                texts = [row.message or "", row.crash_log or ""]
                texts += [e.message for e in session.scalars(select(Event))]
                texts += [r.error or "" for r in session.scalars(select(SyncRun))]
            assert status.state == "Degraded" and status.reason.startswith("CrashLoopBackOff: ")
            assert "exit code 3" in status.reason and "fatal: stand-in engine crashed" in status.reason
            until = f"backing off until {third.retry_after.astimezone(UTC):%H:%M:%S} UTC (attempt 4)"
            assert until in status.reason
            degraded = next(c for c in listed.conditions if c.type == "Degraded")
            assert (degraded.status, degraded.reason) == ("True", "CrashLoopBackOff")
            assert "exit code 3" in degraded.message and "fatal: stand-in engine crashed" in degraded.message
            ready = next(c for c in listed.conditions if c.type == "Ready")
            progressing = next(c for c in listed.conditions if c.type == "Progressing")
            assert ready.status == "False" and progressing.status == "False"
            assert detail is not None
            [replica] = detail.replicas
            assert replica.status == "failed" and replica.last_exit_code == 3 and replica.crash_count == 3
            assert replica.last_log is not None and replica.last_log.endswith("fatal: stand-in engine crashed")
            # Secrets never show: neither the engine key nor the env value from the server, anywhere.
            assert row.engine_key and "loading with key *** token ***" in (row.crash_log or "")
            assert not [text for text in texts if SECRET in text or row.engine_key in text]
            # A pass while it waits (a push, say) holds the recreate back and says so (the sync run's error).
            controller.poke("webhook")
            wait_for("a pass held back", lambda: any("chat/0: backing off until" in (run.error or "")
                                                     for run in _runs(db)), timeout_s=30)

            # A commit that fixes the spec is tried at once, long before the 18 s are over.
            fixed = _push(remote, image=remote.image, message="chat: a working engine")
            controller.poke("webhook")
            wait_for("the fixed replica Ready", lambda: _replica(db).status == "ready", timeout_s=60)
            # Its container was started before the backoff of the broken spec was over (not "Ready by then":
            # how long the engine takes to start is not the backoff's business).
            assert history.attempts("chat", 0)[-1].at < third.retry_after
            assert _replica(db).revision == fixed
            wait_for("the deployment no longer Degraded", lambda: _degraded(db) == "False", timeout_s=30)
        finally:
            assert controller.stop()
    assert set(remote.containers()) == {"chat/0"}


def _runs(db: Database) -> list[SyncRun]:
    with db.session() as session:
        return list(session.scalars(select(SyncRun)))


def _replica(db: Database) -> Replica:
    with db.session() as session:
        return session.scalars(select(Replica)).one()


def _degraded(db: Database) -> str | None:
    with db.session() as session:
        [deployment] = list_deployments(session=session).deployments
    return next((c.status for c in deployment.conditions if c.type == "Degraded"), None)
