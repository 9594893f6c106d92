"""Routes: the read-only status API under /api (workers, deployments, sync, events, plan). Every route needs
a login token or an API key with the "status" scope; a key limited to some models sees only those, and only
admins see engine addresses (Principal.view). The queries are in services/status.py."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from lmstack.api import schemas
from lmstack.api.deps import SessionDep, StateDep, StatusPrincipal
from lmstack.api.errors import ApiError, error_body
from lmstack.api.services import status
from lmstack.manifests import ManifestValidationError

BAD_PARAMETER = schemas.errors(400)

router = APIRouter(prefix="/api", tags=["status"], responses=schemas.errors(
    401, (403, "An API key without the 'status' scope"), 503))

DeploymentName = Annotated[str, Path(pattern=schemas.NAME_PATTERN, max_length=63,
                                     description="the deployment's metadata.name")]


@router.get("/workers", response_model=schemas.WorkerList)
def list_workers(principal: StatusPrincipal, session: SessionDep) -> schemas.WorkerList:
    """Every worker: Ready or NotReady (with the reason), its labels, and a summary of its last facts."""
    return status.list_workers(session=session, view=principal.view)


@router.get("/deployments", response_model=schemas.DeploymentList)
def list_deployments(principal: StatusPrincipal, session: SessionDep) -> schemas.DeploymentList:
    """Every deployment as last applied: replicas wanted and ready, conditions, revisions."""
    return status.list_deployments(session=session, view=principal.view)


@router.get("/deployments/{name}", response_model=schemas.DeploymentDetail,
            responses={**BAD_PARAMETER, 404: {"model": schemas.ErrorResponse, "description": "No such deployment"}})
def get_deployment(name: DeploymentName, principal: StatusPrincipal, session: SessionDep) -> schemas.DeploymentDetail:
    """One deployment with its replicas: where each runs, on which GPUs, its status and (to admins) endpoint."""
    found = status.get_deployment(session=session, name=name, view=principal.view)
    if found is None:
        raise ApiError(404, f"no deployment {name!r}", code="deployment_not_found", param="name")
    return found


@router.get("/sync", response_model=schemas.SyncStatus, responses=BAD_PARAMETER)
def sync_status(principal: StatusPrincipal, state: StateDep,
                limit: Annotated[int, Query(ge=1, le=100, description="how many runs to list")] = 10,
                plans: Annotated[bool, Query(description="each run with its planned changes (actions, reasons) "
                                                         "and their results")] = False,
                ) -> schemas.SyncStatus:
    """The revision last applied, whether it is the repository's current commit, and the latest sync runs."""
    return status.sync_status(database=state.database, repo=state.repo, limit=limit, view=principal.view,
                              plans=plans)


@router.get("/events", response_model=schemas.EventList, responses=BAD_PARAMETER)
def list_events(
    principal: StatusPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    object_ref: Annotated[str | None, Query(alias="object", max_length=200,
                                            description="Kind/name (e.g. Deployment/qwen-7b) or a bare name")] = None,
    type_: Annotated[Literal["Normal", "Warning"] | None, Query(alias="type")] = None,
) -> schemas.EventList:
    """Events, newest first."""
    return status.list_events(session=session, limit=limit, object_ref=object_ref, type_=type_, view=principal.view)


@router.get("/plan", response_model=schemas.PlanResponse, responses={
    422: {"model": schemas.ManifestErrorResponse, "description": "The commit's manifests or inventory are invalid"},
    503: {"model": schemas.ErrorResponse, "description": "No repository configured, or it cannot be read"},
})
def current_plan(principal: StatusPrincipal, state: StateDep) -> schemas.PlanResponse | JSONResponse:
    """What the controller would do now: the configured commit (LMSTACK_REPO at LMSTACK_REF) planned against
    the recorded state. Nothing is changed."""
    try:
        return status.current_plan(database=state.database, repo=state.repo, view=principal.view)
    except status.PlanUnavailable as exc:
        raise ApiError(503, str(exc), code="repository_unavailable") from exc
    except ManifestValidationError as exc:
        count = len(exc.errors)
        body = error_body(422, f"{count} error{'s' if count != 1 else ''} in the manifests: "
                               + "; ".join(str(error) for error in exc.errors[:5])
                               + ("; ..." if count > 5 else ""), code="invalid_manifests")
        body["error"]["errors"] = [schemas.ManifestProblem(file=e.file, line=e.line, path=e.path, message=e.message)
                                   .model_dump(by_alias=True) for e in exc.errors]
        return JSONResponse(body, status_code=422)
