"""The read-only status API's queries: workers, deployments and replicas, sync runs, events, the plan.

Keyword-only functions that take what they read (a session, the database, the settings) and return the
response models; routes only call them. Blocking (SQLAlchemy, git): call them from a thread.

Each takes a `View` of what the caller may see: a key restricted to some models sees only those deployments
(their replicas, events, plan actions), and only admins see addresses (engine endpoints, and addresses
inside messages: blanked for the others).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from lmstack.api import schemas
from lmstack.api.services.repo import NoRepository, RepoView
from lmstack.backends import EffectiveSpec, normalize_applied
from lmstack.gitsource import SourceError
from lmstack.reconcile.observe import load_observed
from lmstack.reconcile.planner import plan as make_plan
from lmstack.reconcile.records import last_applied_run
from lmstack.reconcile.status import SyncState, compare_revisions
from lmstack.state import Database
from lmstack.state.models import Deployment, Event, Replica, SyncRun, Worker

NO_REPO = ("the server has no repository configured: set LMSTACK_REPO (and LMSTACK_REF, default HEAD) to the "
           "fleet's Git repository")


# URLs and IPv4 addresses (with a port) inside messages: an engine's or a worker's address.
# A URL (not its trailing ':' or '.', which belong to the sentence) or an IPv4 address with its port.
_ADDRESS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s,;'\"()<>]*[^\s,;'\"()<>:.]|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
HIDDEN = "[address hidden]"


@dataclass(frozen=True)
class View:
    """What the caller may see. `models`: the served names (None: every one); `addresses`: whether engine
    endpoints and addresses inside messages are shown (admins only)."""

    models: frozenset[str] | None = None
    addresses: bool = True

    def sees(self, served_name: str) -> bool:
        return self.models is None or served_name in self.models

    def text(self, message: str | None) -> str | None:
        """The message, its addresses blanked unless the caller may see them."""
        if message is None or self.addresses:
            return message
        return _ADDRESS.sub(HIDDEN, message)


EVERYTHING = View()


def visible_deployments(session: Session, view: View) -> set[str] | None:
    """The names of the deployments the view sees; None: all of them."""
    if view.models is None:
        return None
    return {name for name, served in session.execute(select(Deployment.name, Deployment.served_name))
            if view.sees(served)}


class PlanUnavailable(Exception):
    """The plan cannot be made: no repository configured, or it cannot be read. The message says which."""


# -- workers --------------------------------------------------------------------------------------------------


def list_workers(*, session: Session, view: View = EVERYTHING) -> schemas.WorkerList:
    visible = visible_deployments(session, view)
    placed: dict[str, list[str]] = defaultdict(list)
    for deployment, ordinal, worker in session.execute(
            select(Replica.deployment_name, Replica.ordinal, Replica.worker_name)
            .order_by(Replica.deployment_name, Replica.ordinal)):
        if visible is None or deployment in visible:
            placed[worker].append(f"{deployment}/{ordinal}")
    return schemas.WorkerList(workers=[_worker(row, placed.get(row.name, []), view)
                                       for row in session.scalars(select(Worker).order_by(Worker.name))])


def _worker(row: Worker, replicas: list[str], view: View) -> schemas.Worker:
    # The planner's rule (reconcile.observe): an error from the last gathering makes the worker NotReady even
    # when older facts are kept; a worker never gathered has nothing to place on.
    if row.facts_error:
        reason: str | None = row.facts_error
    elif row.facts is None:
        reason = "facts not gathered yet (lmstack facts, or the next apply, gathers them)"
    else:
        reason = None
    return schemas.Worker(
        name=row.name, host=row.host, labels=dict(row.labels or {}),
        status="NotReady" if reason else "Ready", reason=view.text(reason),
        facts=_facts(row.facts, view) if row.facts is not None else None, facts_at=row.facts_at, replicas=replicas,
        conditions=[_condition(c, view) for c in row.conditions or [] if _is_condition(c)])


def _facts(facts: Mapping[str, Any], view: View) -> schemas.WorkerFacts:
    return schemas.WorkerFacts(
        gpus=[schemas.Gpu(index=int(gpu.get("index", 0)), name=str(gpu.get("name") or ""),
                          uuid=str(gpu.get("uuid") or ""), memory_total=_int(gpu.get("memory_total")),
                          memory_used=_int(gpu.get("memory_used")),
                          memory_unmanaged=_int(gpu.get("memory_unmanaged")),
                          utilization=_int(gpu.get("utilization")))
              for gpu in facts.get("gpus") or [] if isinstance(gpu, Mapping)],
        gpu_error=view.text(_str(facts.get("gpu_error"))),
        docker_version=_str(facts.get("docker_version")),
        docker_error=view.text(_str(facts.get("docker_error"))),
        nvidia_runtime=facts.get("nvidia_runtime") if isinstance(facts.get("nvidia_runtime"), bool) else None,
        cpus=_int(facts.get("cpus")),
        memory_total=_int(facts.get("memory_total")),
        disk_free=_int(facts.get("disk_free")),
        disk_total=_int(facts.get("disk_total")),
    )


# -- deployments ----------------------------------------------------------------------------------------------


def list_deployments(*, session: Session, view: View = EVERYTHING) -> schemas.DeploymentList:
    ready = _ready_counts(session)
    rows = session.scalars(select(Deployment).order_by(Deployment.name))
    return schemas.DeploymentList(deployments=[_deployment(row, _spec(row), ready.get(row.name, 0), view)
                                               for row in rows if view.sees(row.served_name)])


def get_deployment(*, session: Session, name: str, view: View = EVERYTHING) -> schemas.DeploymentDetail | None:
    """The deployment with its replicas; None when there is none the view sees."""
    row = session.scalars(select(Deployment).where(Deployment.name == name)).one_or_none()
    if row is None or not view.sees(row.served_name):
        return None
    replicas = session.scalars(select(Replica).where(Replica.deployment_name == name)
                               .order_by(Replica.ordinal)).all()
    spec = _spec(row)
    summary = _deployment(row, spec, sum(1 for replica in replicas if replica.status == "ready"), view)
    return schemas.DeploymentDetail(
        **summary.model_dump(),
        image=spec.image if spec else None,
        gpus_per_replica=spec.resources.gpus if spec else 0,
        replicas=[schemas.Replica(
            ordinal=replica.ordinal, name=f"{name}/{replica.ordinal}", worker=replica.worker_name,
            gpus=list(replica.gpu_indices or []), status=replica.status,
            endpoint=replica.endpoint if view.addresses else None, message=view.text(replica.message),
            container_id=replica.container_id, spec_hash=replica.spec_hash,
            revision=replica.revision, updated_at=replica.updated_at, crash_count=replica.crash_count,
            retry_after=replica.retry_after, last_exit_code=replica.crash_exit_code,
            last_log=view.text(replica.crash_log)) for replica in replicas],
        spec=_shown_spec(spec, view) if spec else {},
    )


ENV_HIDDEN = "[value hidden]"


def _shown_spec(spec: EffectiveSpec, view: View) -> dict[str, Any]:
    """The applied spec for display: env values written in the manifest may be secrets, so only their names
    are shown (a reference, fromEnv / fromFile, names where the value comes from and stays); addresses are
    blanked unless the view may see them."""
    shown = spec.to_json()
    shown["env"] = {name: value if isinstance(value, Mapping) else ENV_HIDDEN
                    for name, value in (shown.get("env") or {}).items()}
    blanked: dict[str, Any] = _blank(shown, view)
    return blanked


def _ready_counts(session: Session) -> dict[str, int]:
    counts = session.execute(select(Replica.deployment_name, func.count()).where(Replica.status == "ready")
                             .group_by(Replica.deployment_name))
    return {name: int(count) for name, count in counts}


def _spec(row: Deployment) -> EffectiveSpec | None:
    """The spec the deployment was last applied with; None when it cannot be read (shown as unknown)."""
    return normalize_applied(row.name, row.spec or {})


def _deployment(row: Deployment, spec: EffectiveSpec | None, ready: int, view: View) -> schemas.Deployment:
    return schemas.Deployment(
        name=row.name, served_name=row.served_name, backend=spec.backend if spec else "",
        model=spec.model if spec else "", replicas_wanted=spec.replicas if spec else 0, replicas_ready=ready,
        conditions=[_condition(c, view) for c in row.conditions or [] if _is_condition(c)],
        revision=row.revision, last_attempted_revision=row.last_attempted_revision, spec_hash=row.spec_hash,
        updated_at=row.updated_at)


def _condition(value: Mapping[str, Any], view: View) -> schemas.Condition:
    condition = schemas.Condition.model_validate(value)
    return condition.model_copy(update={"message": view.text(condition.message) or ""})


def _is_condition(value: object) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("type"), str) and isinstance(value.get("status"), str)


# -- sync -------------------------------------------------------------------------------------------------------


def sync_status(*, database: Database, repo: RepoView, limit: int, view: View = EVERYTHING,
                plans: bool = False) -> schemas.SyncStatus:
    """Runs from the database; Synced when the last succeeded run applied the repository's current commit.
    `plans`: each run with its planned changes and their results too.

    Reading the commit fetches a remote repository, so it happens after the database session is closed.
    """
    with database.session() as session:
        visible = visible_deployments(session, view) if plans else None
        runs = [_run(row, view, with_plan=plans, visible=visible)
                for row in session.scalars(select(SyncRun).order_by(SyncRun.id.desc()).limit(limit))]
        applied = last_applied_run(session)
    revision = applied.revision if applied is not None else None
    synced_at = applied.finished_at if applied is not None else None
    head, problem = _head(repo)
    state: SyncState
    if head is None:
        state, message = "Unknown", problem
    else:
        state, message = _compare(head.revision, revision, runs[0] if runs else None)
    return schemas.SyncStatus(state=state, message=view.text(message) or "", revision=revision, synced_at=synced_at,
                              head=head, runs=runs)


def _head(repo: RepoView) -> tuple[schemas.RepoHead | None, str]:
    """The configured repository's current commit, or None and why not."""
    try:
        snapshot = repo.head()
    except NoRepository:
        return None, NO_REPO
    except SourceError as exc:
        return None, f"cannot read the repository: {exc}"
    if snapshot.revision is None:
        return None, f"{snapshot.origin} is not a commit"
    return schemas.RepoHead(origin=snapshot.origin, ref=repo.settings.ref, revision=snapshot.revision.sha,
                            subject=snapshot.revision.subject), ""


def _compare(head: str, applied: str | None, latest: schemas.SyncRun | None) -> tuple[SyncState, str]:
    # The rule `lmstack status` uses too (reconcile.status): both say the same.
    return compare_revisions(head, applied, latest_revision=latest.revision if latest else None,
                             latest_status=latest.status if latest else None,
                             latest_error=latest.error if latest else None)


def _run(row: SyncRun, view: View, *, with_plan: bool = False, visible: set[str] | None = None) -> schemas.SyncRun:
    summary = (row.plan or {}).get("summary") or {}
    return schemas.SyncRun(
        id=row.id, revision=row.revision, subject=row.subject, source=row.source, trigger=row.trigger,
        status=row.status, started_at=row.started_at, finished_at=row.finished_at, error=view.text(row.error),
        summary={str(key): count for key, count in summary.items() if isinstance(count, int)},
        plan=_run_plan(row.plan or {}, view, visible) if with_plan else None,
        result=_run_result(row.result, view, visible) if with_plan and row.result is not None else None)


def _run_plan(stored: Mapping[str, Any], view: View, visible: set[str] | None) -> schemas.SyncRunPlan:
    """The recorded plan without its no-ops (the summary counts them), only the deployments the view sees;
    notes name workers and other deployments, so a key limited to some models gets none."""
    actions = [schemas.SyncRunAction.model_validate(_blank(action, view)) for action in _dicts(stored.get("actions"))
               if action.get("kind") != "noop" and _sees(visible, action.get("deployment"))]
    unplaceable = [schemas.PlanUnplaceable.model_validate(_blank(item, view))
                   for item in _dicts(stored.get("unplaceable")) if _sees(visible, item.get("deployment"))]
    notes = [view.text(note) or "" for note in stored.get("notes") or [] if isinstance(note, str)]
    return schemas.SyncRunPlan(actions=actions, unplaceable=unplaceable, notes=notes if visible is None else [])


def _run_result(stored: Mapping[str, Any], view: View, visible: set[str] | None) -> schemas.SyncRunResult:
    """What each change did (engine endpoints left out: the replica's detail shows them to admins)."""
    def mine(item: Mapping[str, Any]) -> bool:
        return _sees(visible, str(item.get("replica") or "").partition("/")[0])

    actions = [schemas.SyncRunOutcome(kind=str(item.get("kind") or ""), replica=str(item.get("replica") or ""),
                                      ok=bool(item.get("ok")), message=view.text(_str(item.get("message"))),
                                      seconds=item.get("seconds") if isinstance(item.get("seconds"), int | float)
                                      else None)
               for item in _dicts(stored.get("actions")) if mine(item)]
    skipped = [schemas.SyncRunNotActedOn(replica=str(item.get("replica") or ""),
                                         reason=view.text(str(item.get("reason") or "")) or "")
               for item in _dicts(stored.get("notActedOn")) if mine(item)]
    errors = [view.text(error) or "" for error in stored.get("errors") or [] if isinstance(error, str)]
    return schemas.SyncRunResult(actions=actions, errors=errors if visible is None else [], not_acted_on=skipped,
                                 orphans_removed=_int(stored.get("orphansRemoved")) or 0)


def _sees(visible: set[str] | None, deployment: object) -> bool:
    return visible is None or deployment in visible


def _dicts(value: object) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _blank(value: Any, view: View) -> Any:
    """`value` with the addresses in its strings blanked unless the view may see them."""
    if view.addresses:
        return value
    if isinstance(value, str):
        return view.text(value)
    if isinstance(value, Mapping):
        return {key: _blank(item, view) for key, item in value.items()}
    if isinstance(value, list):
        return [_blank(item, view) for item in value]
    return value


# -- events -----------------------------------------------------------------------------------------------------


def list_events(*, session: Session, limit: int, object_ref: str | None = None,
                type_: str | None = None, view: View = EVERYTHING) -> schemas.EventList:
    """Newest first. `object_ref`: "Kind/name" (kind in any case) or a bare name (any kind). A view limited to
    some models sees only those deployments' events."""
    query = select(Event)
    visible = visible_deployments(session, view)
    if visible is not None:
        query = query.where(Event.object_kind == "Deployment", Event.object_name.in_(sorted(visible)))
    if object_ref:
        kind, _, name = object_ref.rpartition("/")
        query = query.where(Event.object_name == name)
        if kind:
            query = query.where(func.lower(Event.object_kind) == kind.lower())
    if type_:
        query = query.where(Event.type == type_)
    rows = session.scalars(query.order_by(Event.id.desc()).limit(limit))
    return schemas.EventList(events=[
        schemas.Event(id=row.id, at=row.at, type=row.type, object_kind=row.object_kind,
                      object_name=row.object_name, reason=row.reason, message=view.text(row.message) or "",
                      sync_run_id=row.sync_run_id) for row in rows])


# -- plan -------------------------------------------------------------------------------------------------------


def current_plan(*, database: Database, repo: RepoView, view: View = EVERYTHING) -> schemas.PlanResponse:
    """What the controller would do now: the configured commit planned against the recorded state.

    Raises PlanUnavailable (no repository, or it cannot be read) and ManifestValidationError (every error
    in the commit's manifests and inventory)."""
    try:
        source = repo.source()
    except NoRepository:
        raise PlanUnavailable(NO_REPO) from None
    except SourceError as exc:
        raise PlanUnavailable(f"cannot read the repository: {exc}") from exc
    with database.session() as session:
        observed = load_observed(session)
    result = make_plan(source.desired, observed, prune=repo.settings.prune)
    revision = source.revision
    answer = schemas.PlanResponse.model_validate({
        "source": {"origin": source.origin, "revision": revision.sha if revision else None,
                   "subject": revision.subject if revision else None},
        **result.to_json(),
        "hasChanges": result.has_changes or bool(result.unplaceable),
    })
    if view.models is None:
        return answer
    seen = {name for name, deployment in source.desired.deployments.items() if view.sees(deployment.served_name)}
    seen |= {name for name, served in observed_served(database) if view.sees(served)}
    actions = [action for action in answer.actions if action.deployment in seen]
    unplaceable = [item for item in answer.unplaceable if item.deployment in seen]
    summary: dict[str, int] = defaultdict(int)
    for action in actions:
        summary[action.kind] += 1
    summary["unplaceable"] = len(unplaceable)
    # Notes name workers and other deployments: left out for a key limited to some models.
    return answer.model_copy(update={"actions": actions, "unplaceable": unplaceable, "notes": [],
                                     "summary": {key: summary.get(key, 0) for key in answer.summary},
                                     "has_changes": any(a.kind != "noop" for a in actions) or bool(unplaceable)})


def observed_served(database: Database) -> list[tuple[str, str]]:
    """(deployment, served name) of every recorded deployment."""
    with database.session() as session:
        return [(name, served) for name, served in session.execute(select(Deployment.name, Deployment.served_name))]


# -- health and metrics -------------------------------------------------------------------------------------------


def check_database(*, database: Database) -> None:
    """Raises when the database does not answer a trivial query."""
    with database.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


@dataclass(frozen=True)
class FleetCounts:
    replicas: Mapping[tuple[str, str], int]  # (deployment, status) -> replicas
    wanted: Mapping[str, int]  # deployment -> replicas its spec asks for


def fleet_counts(*, session: Session) -> FleetCounts:
    replicas = {(deployment, str(status)): int(count) for deployment, status, count in session.execute(
        select(Replica.deployment_name, Replica.status, func.count())
        .group_by(Replica.deployment_name, Replica.status))}
    wanted: dict[str, int] = {}
    for name, stored in session.execute(select(Deployment.name, Deployment.spec)):
        spec = normalize_applied(name, stored or {})
        wanted[name] = spec.replicas if spec else 0
    return FleetCounts(replicas=replicas, wanted=wanted)


# -- logs -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaLocation:
    deployment: str
    ordinal: int
    worker: str
    container_id: str | None


def served_name(*, session: Session, deployment: str) -> str | None:
    """The deployment's served name (what a key's model allowlist names); None when there is no such one."""
    return session.scalar(select(Deployment.served_name).where(Deployment.name == deployment))


def find_replica(*, session: Session, deployment: str, ordinal: int | None) -> ReplicaLocation | None:
    """The replica (`ordinal` None: the lowest); None when the deployment has no such replica."""
    query = select(Replica).where(Replica.deployment_name == deployment)
    if ordinal is not None:
        query = query.where(Replica.ordinal == ordinal)
    row = session.scalars(query.order_by(Replica.ordinal).limit(1)).one_or_none()
    if row is None:
        return None
    return ReplicaLocation(deployment=deployment, ordinal=row.ordinal, worker=row.worker_name,
                           container_id=row.container_id)


def deployment_exists(*, session: Session, name: str) -> bool:
    found = session.scalar(select(func.count()).select_from(Deployment).where(Deployment.name == name))
    return bool(found)


# -- helpers ----------------------------------------------------------------------------------------------------


def _int(value: object) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
