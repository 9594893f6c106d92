"""Every change to the replicas table, as the database saw it (a trigger on a throwaway table): what a user
polling `lmstack status` or /api/deployments could have seen, however short it lasted.

    with ReplicaHistory(db) as history:
        ...
        history.rows("chat", 0)   # [Change(at, status, container_id, crash_count, crashed_at, retry_after,
                                  #         crash_exit_code), ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

from lmstack.state import Database

_SETUP = (
    "CREATE TABLE IF NOT EXISTS test_replica_history (id bigserial PRIMARY KEY, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp(), deployment text, ordinal int, status text, "
    "container_id text, crash_count int, crashed_at timestamptz, retry_after timestamptz, crash_exit_code int)",
    "TRUNCATE test_replica_history",
    "CREATE OR REPLACE FUNCTION test_replica_history() RETURNS trigger AS $$ BEGIN "
    "INSERT INTO test_replica_history (deployment, ordinal, status, container_id, crash_count, crashed_at, "
    "retry_after, crash_exit_code) VALUES (NEW.deployment_name, NEW.ordinal, NEW.status, NEW.container_id, "
    "NEW.crash_count, NEW.crashed_at, NEW.retry_after, NEW.crash_exit_code); RETURN NEW; END $$ LANGUAGE plpgsql",
    "CREATE OR REPLACE TRIGGER test_replica_history AFTER INSERT OR UPDATE ON replicas "
    "FOR EACH ROW EXECUTE FUNCTION test_replica_history()",
)
_TEARDOWN = (
    "DROP TRIGGER IF EXISTS test_replica_history ON replicas",
    "DROP FUNCTION IF EXISTS test_replica_history()",
    "DROP TABLE IF EXISTS test_replica_history",
)


@dataclass(frozen=True)
class Change:
    at: datetime
    status: str
    container_id: str | None
    crash_count: int
    crashed_at: datetime | None
    retry_after: datetime | None
    crash_exit_code: int | None = None


class ReplicaHistory:
    def __init__(self, database: Database) -> None:
        self.database = database

    def __enter__(self) -> ReplicaHistory:
        with self.database.engine.begin() as conn:
            for statement in _SETUP:
                conn.exec_driver_sql(statement)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        # Dropped: the schema must match the models again for the tests that compare them.
        with self.database.engine.begin() as conn:
            for statement in _TEARDOWN:
                conn.exec_driver_sql(statement)

    def rows(self, deployment: str, ordinal: int) -> list[Change]:
        with self.database.engine.connect() as conn:
            found = conn.exec_driver_sql(
                "SELECT at, status, container_id, crash_count, crashed_at, retry_after, crash_exit_code "
                "FROM test_replica_history "
                "WHERE deployment = %(d)s AND ordinal = %(o)s ORDER BY id", {"d": deployment, "o": ordinal}).all()
        return [Change(*row) for row in found]

    def failures(self, deployment: str, ordinal: int) -> list[Change]:
        """One change per failure counted (a new crashed_at), in order."""
        seen: dict[datetime, Change] = {}
        for change in self.rows(deployment, ordinal):
            if change.crashed_at is not None and change.crashed_at not in seen:
                seen[change.crashed_at] = change
        return list(seen.values())

    def attempts(self, deployment: str, ordinal: int) -> list[Change]:
        """The first change naming each new container: when each attempt's container was recorded."""
        seen: dict[str, Change] = {}
        for change in self.rows(deployment, ordinal):
            if change.container_id is not None and change.container_id not in seen:
                seen[change.container_id] = change
        return list(seen.values())
