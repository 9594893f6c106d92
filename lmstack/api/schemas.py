"""Response bodies of the read-only status API (camelCase on the wire, like the manifests)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# A deployment's or worker's metadata.name (the manifests' rule), for path parameters.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


# -- errors (the shape errors.py writes; declared so the OpenAPI document shows it) -------------------------


class ErrorDetail(ApiModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ApiModel):
    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "A request field or parameter is invalid (error.param names it)",
    401: "No valid login token or API key",
    403: "The credentials do not reach this (a login or a key scope is needed, or an admin)",
    404: "Not found",
    413: "The request body is too large",
    429: "Over a rate limit (see Retry-After)",
    503: "Credentials cannot be checked now (the database does not answer; see Retry-After)",
}


def errors(*statuses: int | tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for the error statuses a route may answer, each in the shared error shape (a status, or
    (status, description) to say more than the default)."""
    documented: dict[int | str, dict[str, Any]] = {}
    for item in statuses:
        status, description = item if isinstance(item, tuple) else (item, _ERROR_DESCRIPTIONS[item])
        documented[status] = {"model": ErrorResponse, "description": description}
    return documented


class ManifestProblem(ApiModel):
    file: str
    line: int = Field(description="1-based; 0 when the problem is not on one line")
    path: str = Field(description="the key path inside the document, e.g. spec.replicas")
    message: str


class ManifestErrorDetail(ErrorDetail):
    errors: list[ManifestProblem]


class ManifestErrorResponse(ApiModel):
    error: ManifestErrorDetail


# -- shared pieces --------------------------------------------------------------------------------------


class Condition(ApiModel):
    """Kubernetes-style: Ready / Degraded / ..., status "True" or "False", with why."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")

    type: str
    status: str
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


# -- workers ------------------------------------------------------------------------------------------------


class Gpu(ApiModel):
    index: int
    name: str = ""
    uuid: str = ""
    memory_total: int | None = Field(default=None, description="bytes")
    memory_used: int | None = Field(default=None, description="bytes, by every process")
    memory_unmanaged: int | None = Field(default=None, description="bytes held by processes lmstack did not start")
    utilization: int | None = Field(default=None, description="percent")


class WorkerFacts(ApiModel):
    gpus: list[Gpu]
    gpu_error: str | None = None
    docker_version: str | None = None
    docker_error: str | None = None
    nvidia_runtime: bool | None = None
    cpus: int | None = None
    memory_total: int | None = Field(default=None, description="bytes")
    disk_free: int | None = Field(default=None, description="bytes free where models are cached")
    disk_total: int | None = None


class Worker(ApiModel):
    name: str
    host: str = Field(description="the inventory host")
    labels: dict[str, str]
    status: Literal["Ready", "NotReady"]
    reason: str | None = Field(default=None, description="why the worker is NotReady")
    facts: WorkerFacts | None = Field(default=None, description="the last facts gathered (kept, for display, "
                                                                "when a later gathering failed)")
    facts_at: datetime | None = None
    replicas: list[str] = Field(description="replicas placed on this worker, as deployment/ordinal")
    conditions: list[Condition] = Field(default_factory=list, description="Ready (facts) and Degraded (containers "
                                                                          "not listed, replicas lost), as the last "
                                                                          "pass saw them")


class WorkerList(ApiModel):
    workers: list[Worker]


# -- deployments --------------------------------------------------------------------------------------------


class Deployment(ApiModel):
    name: str
    served_name: str = Field(description="the `model` clients send")
    backend: str
    model: str
    replicas_wanted: int
    replicas_ready: int
    conditions: list[Condition]
    revision: str | None = Field(description="the last commit applied without failure")
    last_attempted_revision: str | None
    spec_hash: str
    updated_at: datetime


class DeploymentList(ApiModel):
    deployments: list[Deployment]


class Replica(ApiModel):
    ordinal: int
    name: str = Field(description="deployment/ordinal")
    worker: str
    gpus: list[int]
    status: str = Field(description="pending, starting, ready, failed, deleting or missing")
    endpoint: str | None
    message: str | None
    container_id: str | None
    spec_hash: str = Field(description="equal to the deployment's when the replica runs the current spec")
    revision: str | None
    updated_at: datetime
    crash_count: int = Field(default=0, description="failures in a row of bringing it up (crash-loop backoff)")
    retry_after: datetime | None = Field(default=None, description="not tried again before then (backing off)")
    last_exit_code: int | None = Field(default=None, description="exit code of the container that failed last")
    last_log: str | None = Field(default=None,
                                 description="that container's last log lines, secrets blanked")


class DeploymentDetail(Deployment):
    image: str | None
    gpus_per_replica: int
    replicas: list[Replica]
    spec: dict[str, Any] = Field(default_factory=dict, description=(
        "the effective spec as last applied, defaults filled in (env values are references, never secrets; "
        "addresses blanked for non-admins); empty when it cannot be read"))


# -- sync -------------------------------------------------------------------------------------------------


class SyncRunAction(ApiModel):
    """A planned change as the run recorded it (what GET /api/plan shows for the pass that was applied)."""

    kind: str = Field(description="create, recreate, update or delete")
    deployment: str
    replica: int
    reason: str
    placement: PlanPlacement | None = None
    previous: PlanPlacement | None = None
    changes: list[FieldChange] = Field(default_factory=list)


class SyncRunPlan(ApiModel):
    actions: list[SyncRunAction] = Field(description="the changes planned (replicas left as they were are only "
                                                     "counted, in the run's summary)")
    unplaceable: list[PlanUnplaceable]
    notes: list[str]


class SyncRunOutcome(ApiModel):
    kind: str
    replica: str = Field(description="deployment/ordinal")
    ok: bool
    message: str | None = None
    seconds: float | None = None


class SyncRunNotActedOn(ApiModel):
    replica: str = Field(description="deployment/ordinal")
    reason: str


class SyncRunResult(ApiModel):
    actions: list[SyncRunOutcome] = Field(description="each planned change, done or failed")
    errors: list[str]
    not_acted_on: list[SyncRunNotActedOn]
    orphans_removed: int = 0


class SyncRun(ApiModel):
    id: int
    revision: str | None
    subject: str | None
    source: str
    trigger: str
    status: Literal["running", "succeeded", "failed"]
    started_at: datetime
    finished_at: datetime | None
    error: str | None
    summary: dict[str, int] = Field(description="the plan's action counts (create, recreate, ...)")
    plan: SyncRunPlan | None = Field(default=None, description="with ?plans=true: what the run planned")
    result: SyncRunResult | None = Field(default=None, description="with ?plans=true: what each change did "
                                                                   "(None while it runs)")


class RepoHead(ApiModel):
    origin: str
    ref: str
    revision: str
    subject: str


class SyncStatus(ApiModel):
    state: Literal["Synced", "OutOfSync", "Unknown"]
    message: str = Field(description="why, in words")
    revision: str | None = Field(description="the revision of the last succeeded sync run")
    synced_at: datetime | None = Field(description="when that run finished")
    head: RepoHead | None = Field(description="the configured repository's current commit (None when no "
                                              "repository is configured or it cannot be read)")
    runs: list[SyncRun] = Field(description="the latest sync runs, newest first")


# -- events -----------------------------------------------------------------------------------------------


class Event(ApiModel):
    id: int
    at: datetime
    type: str = Field(description="Normal or Warning")
    object_kind: str
    object_name: str
    reason: str
    message: str
    sync_run_id: int | None


class EventList(ApiModel):
    events: list[Event]


# -- plan -------------------------------------------------------------------------------------------------


class PlanSource(ApiModel):
    origin: str
    revision: str | None
    subject: str | None


class PlanPlacement(ApiModel):
    worker: str
    gpus: list[int]


class FieldChange(ApiModel):
    path: str
    old: Any
    new: Any


class PlanAction(ApiModel):
    kind: Literal["create", "recreate", "update", "delete", "noop"]
    deployment: str
    replica: int
    reason: str
    placement: PlanPlacement | None
    previous: PlanPlacement | None
    changes: list[FieldChange]
    spec_hash: str | None
    adopt: bool = Field(default=False, description="a replica a stopped pass left unsettled: its readiness is "
                                                   "waited for (it is recreated if it does not become ready)")


class PlanUnplaceable(ApiModel):
    deployment: str
    replica: int
    reason: str


class PlanResponse(ApiModel):
    source: PlanSource
    actions: list[PlanAction]
    unplaceable: list[PlanUnplaceable]
    notes: list[str]
    summary: dict[str, int]
    has_changes: bool


# -- health -------------------------------------------------------------------------------------------------


class Health(ApiModel):
    status: Literal["ok"] = "ok"


class Readiness(ApiModel):
    status: Literal["ready"] = "ready"
    database: Literal["ok"] = "ok"


# -- traffic (the last minutes, in memory) ----------------------------------------------------------------------


class TrafficSeries(ApiModel):
    """One model's buckets, in the order of `Traffic.times`."""

    model: str = Field(description="the served name")
    requests: list[int] = Field(description="requests answered in each bucket")
    errors: list[int] = Field(description="of those, answered with a status of 400 or more")
    prompt_tokens: list[int]
    completion_tokens: list[int]
    ttft_ms: list[float | None] = Field(description="mean time to first token of the bucket's generations, in "
                                                    "milliseconds; null where none")


class Traffic(ApiModel):
    """The gateway's traffic over the last minutes, per model, counted by the server (all its processes
    together); the counts start again when it restarts."""

    bucket_seconds: int
    window_seconds: int
    times: list[int] = Field(description="each bucket's start (unix seconds), oldest first; the last one is "
                                         "still filling")
    now: float = Field(description="the server's clock (unix seconds) when it answered")
    models: list[TrafficSeries] = Field(description="the models with requests in the window, by name")
