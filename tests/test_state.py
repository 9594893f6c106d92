"""The PostgreSQL state layer, against a real server (see conftest.py) and the embedded one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError

from lmstack.config import Settings
from lmstack.state import (
    ApiKey,
    Base,
    Database,
    DatabaseUnavailable,
    Deployment,
    Event,
    Replica,
    SyncRun,
    Usage,
    User,
    Worker,
    current_revision,
    downgrade,
    head_revision,
    normalize_url,
    open_database,
    upgrade,
)

TABLES = {"workers", "deployments", "replicas", "sync_runs", "events", "users", "api_keys", "usage"}


def _tables(database: Database) -> set[str]:
    return set(inspect(database.engine).get_table_names())


@pytest.fixture
def fresh(create_database: Callable[[], str]):
    """An empty, unmigrated database of its own (migration tests change the schema)."""
    database = open_database(Settings(database_url=create_database()), migrate=False)
    yield database
    database.close()


# --- migrations ---------------------------------------------------------------------------------


def test_migrations_up_down_up(fresh: Database):
    assert _tables(fresh) == set()
    assert current_revision(fresh) is None

    upgrade(fresh)
    assert current_revision(fresh) == head_revision() == "0004"
    assert _tables(fresh) == TABLES | {"alembic_version"}

    downgrade(fresh, "base")
    assert current_revision(fresh) is None
    # Only Alembic's (now empty) bookkeeping table is left.
    assert _tables(fresh) == {"alembic_version"}

    upgrade(fresh)
    assert _tables(fresh) == TABLES | {"alembic_version"}
    upgrade(fresh)  # at head already: a no-op
    assert current_revision(fresh) == "0004"


def test_open_database_migrates_a_fresh_database(create_database: Callable[[], str]):
    database = open_database(Settings(database_url=create_database()))
    try:
        assert current_revision(database) == head_revision()
        assert _tables(database) >= TABLES
    finally:
        database.close()


def test_models_match_migrations(db: Database):
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []


def test_concurrent_migrations_do_not_collide(create_database: Callable[[], str]):
    # Several processes starting at once on an empty database: the advisory lock serializes them.
    url = create_database()
    code = "from lmstack.config import Settings; from lmstack.state import open_database; " + (
        f"open_database(Settings(database_url={url!r}))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    database = open_database(Settings(database_url=url), migrate=False)
    try:
        assert current_revision(database) == head_revision()
    finally:
        database.close()


# --- round trips ----------------------------------------------------------------------------------

FACTS = {
    "gpus": [
        {
            "index": 0,
            "uuid": "GPU-1",
            "name": "NVIDIA H200",
            "memory_total": 150_000_000_000,
            "memory_used": 1_000_000,
            "memory_unmanaged": 0,
            "utilization": 3,
        }
    ],
    "docker_version": "27.1",
    "cpus": 16,
    "memory_total": 128 << 30,
    "disk_free": 64 << 30,
}


def test_worker_round_trip(db: Database):
    with db.session() as s:
        s.add(Worker(name="gpu1", host="10.0.0.1", labels={"zone": "a"}, spec={"ssh": {"user": "x"}}))
    with db.session() as s:
        worker = s.scalars(select(Worker).where(Worker.name == "gpu1")).one()
        assert worker.labels == {"zone": "a"}
        assert worker.facts is None and worker.facts_error is None
        assert worker.conditions == []
        assert worker.created_at.tzinfo is not None
        created = worker.updated_at
        worker.facts = FACTS
        worker.facts_at = datetime.now(UTC)
    with db.session() as s:
        worker = s.scalars(select(Worker)).one()
        assert worker.facts == FACTS
        assert worker.facts["gpus"][0]["memory_total"] == 150_000_000_000  # beyond int32
        assert worker.updated_at >= created


def test_deployment_and_replica_round_trip(db: Database):
    spec = {"model": "Qwen/Qwen3-8B", "backend": "vllm", "replicas": 2}
    with db.session() as s:
        s.add(Deployment(name="qwen", served_name="qwen3-8b", spec=spec, spec_hash="h1", revision="abc"))
        s.add_all(
            Replica(
                deployment_name="qwen",
                ordinal=i,
                worker_name="gpu1",
                gpu_indices=[i],
                spec=spec,
                spec_hash="h1",
            )
            for i in range(2)
        )
    with db.session() as s:
        deployment = s.scalars(select(Deployment)).one()
        assert (deployment.served_name, deployment.spec, deployment.last_attempted_revision) == (
            "qwen3-8b",
            spec,
            None,
        )
        replicas = s.scalars(select(Replica).order_by(Replica.ordinal)).all()
        assert [(r.ordinal, r.gpu_indices, r.status) for r in replicas] == [
            (0, [0], "pending"),
            (1, [1], "pending"),
        ]
        # Replicas outlive their deployment row (no foreign key).
        s.delete(deployment)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Replica)) == 2


def test_sync_run_and_events(db: Database):
    with db.session() as s:
        run = SyncRun(
            revision="a" * 40, subject="add qwen", source="git", trigger="poll", plan={"create": ["qwen"]}
        )
        s.add(run)
        s.flush()
        s.add(
            Event(
                object_kind="Deployment",
                object_name="qwen",
                reason="Created",
                message="m",
                sync_run_id=run.id,
            )
        )
        s.add(
            Event(
                type="Warning", object_kind="Worker", object_name="gpu1", reason="FactsFailed", message="ssh"
            )
        )
        run_id = run.id
    with db.session() as s:
        run = s.get_one(SyncRun, run_id)
        assert (run.status, run.plan, run.result, run.finished_at) == (
            "running",
            {"create": ["qwen"]},
            None,
            None,
        )
        events = s.scalars(select(Event).order_by(Event.id)).all()
        assert [(e.type, e.reason, e.sync_run_id) for e in events] == [
            ("Normal", "Created", run_id),
            ("Warning", "FactsFailed", None),
        ]
        s.delete(run)
    with db.session() as s:
        # ON DELETE SET NULL: the events stay.
        assert s.scalars(select(Event.sync_run_id)).all() == [None, None]


def test_users_api_keys_usage(db: Database):
    hour = datetime(2026, 1, 1, 12, tzinfo=UTC)
    with db.session() as s:
        user = User(name="alice", password_hash="x", role="admin")
        s.add(user)
        s.flush()
        key = ApiKey(
            name="ci", user_id=user.id, prefix="lms_abcd", key_hash="h", models=["qwen"], rpm_limit=60
        )
        s.add(key)
        s.flush()
        s.add(Usage(api_key_id=key.id, model="qwen", hour=hour, requests=1, prompt_tokens=10))
    with db.session() as s:
        user = s.scalars(select(User)).one()
        assert (user.role, user.disabled) == ("admin", False)
        key = s.scalars(select(ApiKey).where(ApiKey.prefix == "lms_abcd")).one()
        assert (key.models, key.rpm_limit, key.revoked_at) == (["qwen"], 60, None)
        usage = s.scalars(select(Usage)).one()
        assert (usage.requests, usage.errors, usage.prompt_tokens, usage.hour) == (1, 0, 10, hour)
        # Deleting the user deletes its keys; their usage stays, unattributed.
        s.delete(user)
    with db.session() as s:
        assert s.scalars(select(ApiKey)).all() == []
        assert s.scalars(select(Usage.api_key_id)).all() == [None]


# --- constraints ------------------------------------------------------------------------------------


def test_duplicate_worker_name_rejected(db: Database):
    with db.session() as s:
        s.add(Worker(name="gpu1", host="a"))
    with pytest.raises(IntegrityError, match="uq_workers_name"), db.session() as s:
        s.add(Worker(name="gpu1", host="b"))
    with db.session() as s:  # the failed transaction was rolled back; the first row is intact
        assert s.scalars(select(Worker.host)).all() == ["a"]


def test_duplicate_replica_ordinal_rejected(db: Database):
    def replica() -> Replica:
        return Replica(deployment_name="qwen", ordinal=0, worker_name="w", spec={}, spec_hash="h")

    with db.session() as s:
        s.add(replica())
    with pytest.raises(IntegrityError, match="uq_replicas_deployment_name_ordinal"), db.session() as s:
        s.add(replica())


def test_role_check_constraint(db: Database):
    with pytest.raises(IntegrityError, match="ck_users_role"), db.session() as s:
        s.add(User(name="bob", password_hash="x", role="root"))


def _record(db: Database, api_key_id: int | None, hour: datetime, tokens: int) -> None:
    stmt = insert(Usage).values(
        api_key_id=api_key_id, model="qwen", hour=hour, requests=1, prompt_tokens=tokens, latency_ms_sum=100
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Usage.api_key_id, Usage.model, Usage.revision, Usage.hour],
        set_={
            "requests": Usage.requests + stmt.excluded.requests,
            "prompt_tokens": Usage.prompt_tokens + stmt.excluded.prompt_tokens,
            "latency_ms_sum": Usage.latency_ms_sum + stmt.excluded.latency_ms_sum,
        },
    )
    with db.session() as s:
        s.execute(stmt)


def test_usage_rollup_upsert(db: Database):
    hour = datetime(2026, 1, 1, 12, tzinfo=UTC)
    with db.session() as s:
        user = User(name="alice", password_hash="x", role="viewer")
        s.add(user)
        s.flush()
        key = ApiKey(name="k", user_id=user.id, prefix="lms_1", key_hash="h")
        s.add(key)
        s.flush()
        key_id = key.id
    for api_key_id in (None, None, None, key_id, key_id):
        _record(db, api_key_id, hour, 10)
    _record(db, None, hour + timedelta(hours=1), 5)
    with db.session() as s:
        rows = s.execute(
            select(
                Usage.api_key_id, Usage.hour, Usage.requests, Usage.prompt_tokens, Usage.latency_ms_sum
            ).order_by(Usage.api_key_id.nulls_first(), Usage.hour)
        ).all()
    # The NULL-key rows roll up into one row per hour too (NULLS NOT DISTINCT).
    assert [tuple(r) for r in rows] == [
        (None, hour, 3, 30, 300),
        (None, hour + timedelta(hours=1), 1, 5, 100),
        (key_id, hour, 2, 20, 200),
    ]


def test_session_rolls_back_on_error(db: Database):
    with pytest.raises(RuntimeError), db.session() as s:
        s.add(Worker(name="gpu1", host="a"))
        s.flush()
        raise RuntimeError("boom")
    with db.session() as s:
        assert s.scalars(select(Worker)).all() == []


# --- URLs and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["postgres://u:p@h:5433/d", "postgresql://u:p@h:5433/d", "postgresql+psycopg://u:p@h:5433/d"],
)
def test_normalize_url(url: str):
    assert normalize_url(url).render_as_string(hide_password=False) == "postgresql+psycopg://u:p@h:5433/d"


def test_normalize_url_rejects_other_databases():
    with pytest.raises(ValueError, match="PostgreSQL"):
        normalize_url("sqlite:///x.db")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_database_is_a_clear_error():
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        open_database(Settings(database_url=f"postgresql://lmstack:s3cret-pw@127.0.0.1:{port}/lmstack"))
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "LMSTACK_DATABASE_URL" in message and "running" in message
    assert "s3cret-pw" not in message
    assert "s3cret-pw" not in repr(info.value.__cause__) and info.value.__suppress_context__
    assert time.monotonic() - started < 5


# --- embedded PostgreSQL --------------------------------------------------------------------------

EMBEDDED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from sqlalchemy import select
    from lmstack.config import Settings
    from lmstack.state import Worker, current_revision, open_database

    started = time.monotonic()
    db = open_database(Settings())
    seconds = time.monotonic() - started
    with db.session() as s:
        s.add(Worker(name=sys.argv[1], host="localhost"))
    with db.session() as s:
        names = s.scalars(select(Worker.name).order_by(Worker.id)).all()
    pid = int((Settings().embedded_database_dir / "postmaster.pid").read_text().split()[0])
    print(json.dumps({"names": names, "revision": current_revision(db), "embedded": db.embedded,
                      "pid": pid, "seconds": seconds}), flush=True)
    if sys.argv[2] == "crash":
        os._exit(0)  # no atexit handlers: the server is left running
    """
)


def _postgres_alive(pid: int) -> bool:
    """Whether the process runs (an exited one not yet reaped by its parent, a zombie, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop_leftover(data_dir: Path) -> None:
    """If a server is still running in data_dir (the test failed), stop it."""
    pidfile = data_dir / "postmaster.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text().split()[0])
        if _postgres_alive(pid):
            os.kill(pid, signal.SIGINT)  # fast shutdown


def test_embedded_default_needs_no_configuration(tmp_path: Path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "LMSTACK_DATABASE_URL"}
    env["LMSTACK_HOME"] = str(home)
    data_dir = home / "postgres"
    try:
        results = []
        # 1: creates the data directory; 2: restarts the server on it, then dies without stopping it;
        # 3: joins the server left running and, as the last user, stops it at exit.
        for name, mode in (("first", "normal"), ("second", "crash"), ("third", "normal")):
            proc = subprocess.run(
                [sys.executable, "-c", EMBEDDED_SCRIPT, name, mode],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, proc.stderr
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
            if mode == "crash":
                assert _postgres_alive(result["pid"])
            else:
                # Stopped when the process exited: no postgres left behind.
                assert not _postgres_alive(result["pid"])
                assert not (data_dir / "postmaster.pid").exists()
        first, second, third = results
        assert first["names"] == ["first"]
        assert third["names"] == ["first", "second", "third"]
        assert third["pid"] == second["pid"]  # joined the running server
        assert first["embedded"] and first["revision"] == head_revision()
        assert (data_dir / "PG_VERSION").exists()
        print(f"embedded start: first {first['seconds']:.2f}s, restart {second['seconds']:.2f}s")
        assert first["seconds"] < 15
    finally:
        _stop_leftover(data_dir)
