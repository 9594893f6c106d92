"""Crash-loop backoff: a replica that keeps failing is brought up again after 2 s, then 6 s, 18 s, ... at most
5 min, and its deployment is Degraded with the exit code and the last log lines of the container that failed.

What counts as a failure of the replica's own (on its row: crash_count, crashed_at, retry_after, and what the
container left: crash_exit_code, crash_log with secrets blanked, read before the next attempt removes it):
- a create or recreate that fails for a permanent reason: the engine exited or never became ready, a secret
  or the image is missing (`after`). Transient failures (the worker or Docker did not answer) are not
  counted: the controller retries those passes with its own backoff (controller/loop.py);
- a container recorded as running that is found stopped (`note_lost`). The first such crash of a replica is
  repaired at once (drift repair: it was up, this is no loop yet); a second one in a row waits 2 s, then 6 s,
  ... A container found gone (`docker rm`) is drift, not a crash, and is always recreated at once.

After failure N in a row a new attempt may start at its time + 2 s x 3^(N-1), capped at 5 min (the first crash
of a running replica excepted: at once). An action that would
bring up a replica before then is held back (`hold_back`) and reported as "backing off until HH:MM:SS UTC
(attempt N)"; the pass is then not ok, and the controller wakes for the earliest retry_after (`retry_at`).

The count starts again at 1 (the backoff resets) when the spec changed since the last failure (a commit that
fixes it is tried at once, whatever the backoff), or when the replica was up RESET_AFTER_S (10 min) before it
failed: the crashed container had run that long, or the replica had become Ready (which clears retry_after,
records.py) and its last failure is that old. A replica that stayed up that long was healthy. One that becomes
Ready and crashes within 10 min keeps counting: that is a crash loop too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from lmstack.backends import EffectiveSpec
from lmstack.backends.container import LABEL_DEPLOYMENT, LABEL_REPLICA
from lmstack.manifests.policy import PushLimits
from lmstack.nodes.docker import DockerPool, ManagedContainer, NodeError
from lmstack.nodes.docker.errors import redact
from lmstack.reconcile.live import LiveView
from lmstack.reconcile.model import Action, ActionKind
from lmstack.reconcile.records import record_crash
from lmstack.reconcile.secrets import SecretError, resolve_env
from lmstack.state import Database, Replica

FIRST_S = 2.0
FACTOR = 3.0
CAP_S = 300.0
RESET_AFTER_S = 600.0
TAIL_LINES = 5
_TAIL_CHARS = 1000  # the stored tail, at most: a log line may be a megabyte


def delay_s(failures: int) -> float:
    """How long after its `failures`-th failure in a row a replica waits: 2, 6, 18, 54, 162, 300, 300, ..."""
    return min(CAP_S, FIRST_S * FACTOR ** (max(failures, 1) - 1))


def next_count(previous: int, *, same_spec: bool, ran_s: float | None = None) -> int:
    """The failure count after one more failure: 1 when the spec changed or the container had run long enough
    to be called healthy, else one more than before."""
    if not same_spec or (ran_s is not None and ran_s >= RESET_AFTER_S):
        return 1
    return previous + 1


@dataclass(frozen=True)
class Held:
    """An action not taken because its replica is backing off."""

    deployment: str
    replica: int
    until: datetime
    attempt: int

    @property
    def reason(self) -> str:
        return f"backing off until {self.until.astimezone(UTC):%H:%M:%S} UTC (attempt {self.attempt})"


class Outcome(Protocol):
    """What `after` reads of an action's result (execute.ActionResult)."""

    @property
    def action(self) -> Action: ...

    @property
    def ok(self) -> bool: ...

    @property
    def retryable(self) -> bool | None: ...


def secret_values(deployment: str, spec: EffectiveSpec | None, *, environ: Mapping[str, str], limits: PushLimits,
                  engine_key: str | None) -> list[str]:
    """The values to blank from a replica's logs: its engine key and its env values resolved from the server
    (`fromEnv`, `fromFile`; plain values are in Git anyway). One that cannot be resolved was never given."""
    values = [engine_key] if engine_key else []
    for name, value in (spec.env.items() if spec is not None else ()):
        if isinstance(value, str):
            continue
        try:
            values += resolve_env(deployment, {name: value}, environ=environ, limits=limits).values()
        except SecretError:
            continue
    return values


def read_log_tail(pool: DockerPool, worker: str, container_id: str, *, secrets: Sequence[str],
                  lines: int = TAIL_LINES) -> str:
    """The container's last `lines` log lines joined by " | ", secrets blanked; "" when there are none or the
    worker does not answer."""
    try:
        text = b"".join(pool.logs(worker, container_id, follow=False, tail=lines)).decode(errors="replace")
    except NodeError:
        return ""
    joined = " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())
    joined = redact(joined, secrets)
    return joined if len(joined) <= _TAIL_CHARS else "…" + joined[-(_TAIL_CHARS - 1):]


class CrashBackoff:
    """The backoff of one apply pass: `note_lost` and `hold_back` before the actions run, `after` once they
    have, `retry_at` for the controller."""

    def __init__(self, database: Database, pool: DockerPool, *, specs: Mapping[str, EffectiveSpec],
                 environ: Mapping[str, str], limits: PushLimits,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.database = database
        self.pool = pool
        self.specs = specs
        self.environ = environ
        self.limits = limits
        self.clock = clock

    def note_lost(self, live: LiveView) -> None:
        """Count the crash of every replica recorded running whose container was found stopped."""
        for lost in live.lost:
            container = live.containers.get((lost.deployment, lost.ordinal))
            if lost.status != "failed" or container is None:
                continue
            with self.database.session() as session:
                row = _row(session, lost.deployment, lost.ordinal)
                if row is None:
                    continue
                started, finished = _aware(container.started_at), _aware(container.finished_at)
                ran_s = (finished - started).total_seconds() if started and finished else None
                count = next_count(row.crash_count, same_spec=row.crash_spec_hash == row.spec_hash, ran_s=ran_s)
                crashed_at = self.clock()
                wait = 0.0 if count == 1 else delay_s(count)  # the first crash of a running replica: at once
                record_crash(session, deployment=lost.deployment, ordinal=lost.ordinal, count=count,
                             crashed_at=crashed_at, retry_after=crashed_at + timedelta(seconds=wait),
                             exit_code=container.exit_code,
                             log=self._tail(lost.deployment, row, lost.worker, container) or None,
                             spec_hash=row.spec_hash)

    def hold_back(self, actions: Sequence[Action]) -> tuple[list[Action], tuple[Held, ...]]:
        """The actions to take now, and those held back (see `hold_back`)."""
        return hold_back(self.database, actions, now=self.clock())

    def after(self, results: Iterable[Outcome]) -> None:
        """Count every create or recreate that failed for a permanent reason, with what its container left."""
        for result in results:
            action = result.action
            if result.ok or result.retryable or action.kind is ActionKind.DELETE or action.placement is None:
                continue
            worker = action.placement.worker
            container = self._container(worker, action)
            with self.database.session() as session:
                row = _row(session, action.deployment, action.replica)
                if row is None:
                    continue
                crashed_at = self.clock()
                # Ready since its last failure (retry_after cleared): up at most that long.
                up_s = (crashed_at - row.crashed_at).total_seconds() \
                    if row.retry_after is None and row.crashed_at is not None else None
                count = next_count(row.crash_count, same_spec=row.crash_spec_hash == action.spec_hash, ran_s=up_s)
                exit_code = self._exit_code(worker, container) if container is not None else None
                log = self._tail(action.deployment, row, worker, container) if container is not None else ""
                record_crash(session, deployment=action.deployment, ordinal=action.replica, count=count,
                             crashed_at=crashed_at, retry_after=crashed_at + timedelta(seconds=delay_s(count)),
                             exit_code=exit_code, log=log or None, spec_hash=action.spec_hash)

    def retry_at(self) -> datetime | None:
        """The earliest time a replica held back may be tried again (None: none is waiting)."""
        with self.database.session() as session:
            return session.scalar(select(func.min(Replica.retry_after)).where(
                Replica.retry_after > self.clock(), _waiting()))

    def _exit_code(self, worker: str, container: ManagedContainer) -> int | None:
        """How the container last exited. Docker resets the exit code in the state of a container its restart
        policy started again: then its last `die` event says."""
        if not container.running:
            return container.exit_code
        try:
            return self.pool.last_exit_code(worker, container.id)
        except NodeError:
            return None

    def _container(self, worker: str, action: Action) -> ManagedContainer | None:
        """The replica's newest container on the worker (the one that just failed), if it is still there."""
        try:
            mine = [c for c in self.pool.list_managed(worker)
                    if c.labels.get(LABEL_DEPLOYMENT) == action.deployment
                    and c.labels.get(LABEL_REPLICA) == str(action.replica)]
        except NodeError:
            return None
        oldest = datetime.min.replace(tzinfo=UTC)
        return max(mine, key=lambda c: _aware(c.started_at) or oldest, default=None)

    def _tail(self, deployment: str, row: Replica, worker: str, container: ManagedContainer) -> str:
        secrets = secret_values(deployment, self.specs.get(deployment), environ=self.environ, limits=self.limits,
                                engine_key=row.engine_key)
        return read_log_tail(self.pool, worker, container.id, secrets=secrets)


def hold_back(database: Database, actions: Sequence[Action], *, now: datetime) -> tuple[list[Action], tuple[Held, ...]]:
    """The actions to take now, and those held back: any but a delete for a replica whose retry_after lies
    ahead, for the spec that failed (a changed spec is tried at once), when the replica is not ready or the
    action is a surge (a rollout whose replacement failed: the old replica keeps serving meanwhile). Reads
    only the database: `lmstack plan` shows what apply would hold back."""
    with database.session() as session:
        waiting = {(row.deployment_name, row.ordinal): (row.retry_after, row.crash_count, row.crash_spec_hash,
                                                        row.status)
                   for row in session.execute(
                       select(Replica.deployment_name, Replica.ordinal, Replica.retry_after,
                              Replica.crash_count, Replica.crash_spec_hash, Replica.status)
                       .where(Replica.retry_after > now, _waiting()))}
    take, held = [], []
    for action in actions:
        found = waiting.get((action.deployment, action.replica))
        if (action.kind is ActionKind.DELETE or found is None or found[2] != action.spec_hash
                or (found[3] == "ready" and action.surge is None)):
            take.append(action)
            continue
        until, count, _, _ = found
        assert until is not None  # selected so
        held.append(Held(action.deployment, action.replica, until, count + 1))
    return take, tuple(held)


def _waiting() -> ColumnElement[bool]:
    """Replicas a retry_after may hold back: not ready, or ready with a failed rollout to another spec."""
    return or_(Replica.status != "ready", Replica.crash_spec_hash != Replica.spec_hash)


def _row(session: Session, deployment: str, ordinal: int) -> Replica | None:
    return session.scalars(select(Replica).where(Replica.deployment_name == deployment,
                                                 Replica.ordinal == ordinal)).one_or_none()


def _aware(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment
