"""Usage: one record per gateway request, buffered in memory, rolled up per (API key, model, revision, hour)
into the `usage` table by a background flush.

The revision is the commit the replica that answered was created from (which config served the request).
The gateway passes it when it knows it; a record without one is given its replica's recorded revision when
it is written, a few seconds later (a replica recreated from a newer commit in between is credited with
that one).

The request path only appends to a deque (`record`, no I/O, no lock), so a slow or unreachable database
never slows or fails a request. `run()` flushes every `flush_s` seconds: the buffered records are rolled
up in a thread and upserted in one transaction (`INSERT ... ON CONFLICT DO UPDATE` adding the counts, so
several servers can write the same rows). If the write fails the records go back to the front of the
buffer and the next flush tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from lmstack.api.services.limits import Limits
from lmstack.api.services.metrics import MetricsRecorder
from lmstack.state import ApiKey, Database, Replica, Usage, User

log = logging.getLogger("lmstack.api.usage")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One request through the gateway."""

    key_id: int | None  # the API key used; None for a login token
    model: str  # the served name the client asked for
    replica: str | None  # deployment/ordinal that answered; None when none was reached
    status: int  # HTTP status the client got (a stream cut short: 502/504; the client gone: 499)
    latency_ms: int  # from the request to the end of the answer
    ttft_ms: int  # to the first byte of the engine's answer (0 when none came)
    prompt_tokens: int  # as the engine reported them (0 when it did not)
    completion_tokens: int
    at: float  # unix time the request arrived
    revision: str | None = None  # the commit the replica was created from (None: not known yet, or no replica)

    @property
    def failed(self) -> bool:
        return self.status >= 400


Rollup = dict[str, Any]  # one row's worth of counts: the bind parameters of the upsert


def rollup(records: Iterable[UsageRecord]) -> list[Rollup]:
    """Records summed per (key, model, revision, hour), sorted by that key (a fixed lock order across servers)."""
    sums: dict[tuple[int | None, str, str | None, int], list[int]] = {}
    for r in records:
        row = sums.setdefault((r.key_id, r.model, r.revision, int(r.at // 3600)),  # hours since 1970
                              [0, 0, 0, 0, 0, 0])
        row[0] += 1
        row[1] += r.failed
        row[2] += r.prompt_tokens
        row[3] += r.completion_tokens
        row[4] += r.latency_ms
        row[5] += r.ttft_ms
    ordered = sorted(sums.items(), key=lambda item: (item[0][0] is None, item[0][0] or 0, item[0][1],
                                                     item[0][2] is None, item[0][2] or "", item[0][3]))
    return [{"p_key_id": key_id, "p_model": model, "p_revision": revision,
             "p_hour": datetime.fromtimestamp(hour * 3600, UTC), "p_requests": n[0], "p_errors": n[1],
             "p_prompt_tokens": n[2], "p_completion_tokens": n[3], "p_latency_ms_sum": n[4], "p_ttft_ms_sum": n[5]}
            for (key_id, model, revision, hour), n in ordered]


def _upsert_statement() -> Any:
    # A key deleted since the request was made rolls up with the keyless rows instead of failing the
    # whole batch on the foreign key: the subquery finds no row and gives NULL.
    key_id = select(ApiKey.id).where(ApiKey.id == bindparam("p_key_id")).scalar_subquery()
    stmt = insert(Usage).values(
        api_key_id=key_id, model=bindparam("p_model"), revision=bindparam("p_revision"), hour=bindparam("p_hour"),
        requests=bindparam("p_requests"), errors=bindparam("p_errors"),
        prompt_tokens=bindparam("p_prompt_tokens"), completion_tokens=bindparam("p_completion_tokens"),
        latency_ms_sum=bindparam("p_latency_ms_sum"), ttft_ms_sum=bindparam("p_ttft_ms_sum"))
    added = ("requests", "errors", "prompt_tokens", "completion_tokens", "latency_ms_sum", "ttft_ms_sum")
    return stmt.on_conflict_do_update(
        index_elements=[Usage.api_key_id, Usage.model, Usage.revision, Usage.hour],
        set_={name: getattr(Usage, name) + getattr(stmt.excluded, name) for name in added})


_UPSERT = _upsert_statement()


class UsageRecorder:
    """Buffers usage records and writes them, rolled up, every `flush_s` seconds.

    The bound: at most `max_buffer` records (Settings.usage_buffer, LMSTACK_USAGE_BUFFER, default 100 000)
    wait in memory, about 150 bytes each (15 MB at the default). Normally a flush empties the buffer every
    `flush_s`; it only fills while the database cannot be written. Once it is full, every new record pushes
    out the oldest one, which is lost and counted in `dropped` (the newest usage is kept). While a batch is
    being written, new records wait beside it; if that write fails, the batch goes back in front of them
    and the oldest beyond the bound are dropped. Records still buffered when the process is killed are
    lost; a clean shutdown flushes once more.
    """

    def __init__(self, database: Database, *, max_buffer: int, flush_s: float, metrics: MetricsRecorder,
                 limits: Limits) -> None:
        self.database = database
        self.max_buffer = max_buffer
        self.flush_s = flush_s
        self.metrics = metrics
        self._buffer: deque[UsageRecord] = deque()
        self._flushing = asyncio.Lock()
        self._in_flight = 0  # records in the batch being written
        self.dropped = 0  # records pushed out of a full buffer, never written
        self.written = 0  # records written to the database
        self.failed_flushes = 0  # flushes that could not write (the records stayed buffered)
        self.last_error: str | None = None  # why the last flush failed; None once one succeeds
        # Per-key token limits: every answer's tokens, and every batch written, are told to them here.
        self.limits = limits

    @property
    def pending(self) -> int:
        """Records not written yet: buffered, or in the batch being written."""
        return len(self._buffer) + self._in_flight

    def record(self, *, key_id: int | None, model: str, replica: str | None, status: int, latency_ms: int,
               ttft_ms: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0,
               at: float | None = None, revision: str | None = None) -> None:
        """Buffer one request's usage. Never blocks, never raises for the database's sake. `revision`: the
        commit the answering replica was created from (None: looked up by `replica` when written)."""
        self.append(UsageRecord(key_id=key_id, model=model, replica=replica, status=status,
                                latency_ms=max(latency_ms, 0), ttft_ms=max(ttft_ms, 0),
                                prompt_tokens=max(prompt_tokens, 0), completion_tokens=max(completion_tokens, 0),
                                at=time.time() if at is None else at, revision=revision))

    def append(self, record: UsageRecord) -> None:
        # Every gateway request passes here once, so this is also where the Prometheus series are fed.
        self.metrics.answered(record.model, record.status, record.latency_ms / 1000,
                              record.ttft_ms / 1000 if record.ttft_ms else None, record.prompt_tokens,
                              record.completion_tokens)
        if record.prompt_tokens or record.completion_tokens:
            self.limits.used(record)
        if len(self._buffer) >= self.max_buffer:
            self._buffer.popleft()
            self._dropped(1)
        self._buffer.append(record)

    def _dropped(self, count: int) -> None:
        self.dropped += count
        self.metrics.usage_dropped(count)

    async def run(self) -> None:
        """Flush every `flush_s` until cancelled. A flush in progress finishes even if this is cancelled."""
        while True:
            await asyncio.sleep(self.flush_s)
            await asyncio.shield(self.flush())

    async def flush(self) -> bool:
        """Write what is buffered; False (records kept for the next flush) when the database failed."""
        async with self._flushing:
            if not self._buffer:
                return True
            batch = list(self._buffer)
            self._buffer.clear()
            self._in_flight = len(batch)
            try:
                written_at = await asyncio.to_thread(self._write, batch)
            except SQLAlchemyError as exc:
                self._requeue(batch)
                self.failed_flushes += 1
                if self.last_error is None:
                    log.warning("cannot write usage to the database; keeping %d records in memory (at most %d): %s",
                                len(self._buffer), self.max_buffer, " ".join(str(exc).split())[:500])
                self.last_error = str(exc)
                return False
            finally:
                self._in_flight = 0
            if self.last_error is not None:
                log.warning("usage written to the database again (%d records)", len(batch))
            self.last_error = None
            self.written += len(batch)
            self.limits.written(batch, at=written_at)
            return True

    def _write(self, batch: list[UsageRecord]) -> datetime | None:
        """Write the batch; then the database's clock, which a read of usage later than that sees it in (None
        when it could not be read: the batch is written all the same)."""
        with self.database.engine.connect() as conn:
            with conn.begin():
                conn.execute(_UPSERT, rollup(with_revisions(conn, batch)))
            try:
                written_at: datetime | None = conn.scalar(select(func.now()))
            except SQLAlchemyError:
                written_at = None
            return written_at

    def _requeue(self, batch: list[UsageRecord]) -> None:
        # Older records go back in front of those recorded during the failed write; over the bound, the
        # oldest are dropped.
        self._buffer.extendleft(reversed(batch))
        while len(self._buffer) > self.max_buffer:
            self._buffer.popleft()
            self._dropped(1)


def with_revisions(conn: Connection, records: list[UsageRecord]) -> list[UsageRecord]:
    """The records, each one without a revision given its replica's recorded revision (one query for all)."""
    keys = [_replica_key(r.replica) if r.revision is None else None for r in records]
    wanted = sorted({key for key in keys if key is not None})
    if not wanted:
        return records
    revisions = {(name, ordinal): revision for name, ordinal, revision in conn.execute(
        select(Replica.deployment_name, Replica.ordinal, Replica.revision)
        .where(tuple_(Replica.deployment_name, Replica.ordinal).in_(wanted)))}
    return [r if key is None else replace(r, revision=revisions.get(key)) for r, key in zip(records, keys, strict=True)]


def _replica_key(replica: str | None) -> tuple[str, int] | None:
    """("chat", 0) for "chat/0"; None for anything else."""
    name, _, ordinal = (replica or "").rpartition("/")
    return (name, int(ordinal)) if name and ordinal.isdigit() else None


# -- reading ---------------------------------------------------------------------------------------------


def query_usage(session: Session, *, user: str | None, models: Collection[str] | None = None,
                since: datetime | None = None,
                until: datetime | None = None, model: str | None = None, key_id: int | None = None,
                limit: int = 1000) -> list[dict[str, Any]]:
    """Rolled-up usage, newest hour first. `user`: only that user's keys (None: everything, for admins);
    `models`: only these models (None: every one).

    `since` is inclusive and `until` exclusive, both compared with the hour a row covers.
    """
    stmt = (
        select(Usage, ApiKey.name, User.name)
        .outerjoin(ApiKey, ApiKey.id == Usage.api_key_id)
        .outerjoin(User, User.id == ApiKey.user_id)
        .order_by(Usage.hour.desc(), Usage.model, Usage.api_key_id, Usage.revision)
        .limit(limit)
    )
    if user is not None:
        stmt = stmt.where(User.name == user)
    if since is not None:
        stmt = stmt.where(Usage.hour >= _utc(since))
    if until is not None:
        stmt = stmt.where(Usage.hour < _utc(until))
    if model is not None:
        stmt = stmt.where(Usage.model == model)
    if models is not None:
        stmt = stmt.where(Usage.model.in_(sorted(models)))
    if key_id is not None:
        stmt = stmt.where(Usage.api_key_id == key_id)
    return [{"key_id": row.api_key_id, "key_name": key_name, "user": user_name, "model": row.model,
             "revision": row.revision, "hour": row.hour.astimezone(UTC).isoformat(), "requests": row.requests,
             "errors": row.errors,
             "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
             "total_tokens": row.prompt_tokens + row.completion_tokens,
             "latency_ms_sum": row.latency_ms_sum, "ttft_ms_sum": row.ttft_ms_sum}
            for row, key_name, user_name in session.execute(stmt).all()]


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
