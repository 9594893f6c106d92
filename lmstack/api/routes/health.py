"""Routes: /healthz (the process answers) and /readyz (and its database does). No auth: for probes and load
balancers. Neither says more than ok / not ok: details go to the server log."""

from __future__ import annotations

import functools
import logging

import anyio
from fastapi import APIRouter

from lmstack.api import schemas
from lmstack.api.deps import StateDep
from lmstack.api.errors import ApiError
from lmstack.api.services.status import check_database

log = logging.getLogger(__name__)

# A probe must get an answer within its own timeout (Kubernetes: 1 s by default); a database that has not
# answered by then counts as down.
READY_TIMEOUT_S = 1.0

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health)
async def healthz() -> schemas.Health:
    """The process is alive (touches nothing else)."""
    return schemas.Health()


@router.get("/readyz", response_model=schemas.Readiness,
            responses={503: {"model": schemas.ErrorResponse, "description": "The database does not answer"}})
async def readyz(state: StateDep) -> schemas.Readiness:
    """Ready to serve: the database answers a trivial query within READY_TIMEOUT_S."""
    try:
        with anyio.fail_after(READY_TIMEOUT_S):
            # abandon_on_cancel: at the deadline the probe is answered; a connect still hanging ends on its own
            # (libpq's connect_timeout) without holding the answer back.
            await anyio.to_thread.run_sync(functools.partial(check_database, database=state.database),
                                           abandon_on_cancel=True)
    except TimeoutError:
        log.warning("readyz: the database did not answer within %.1fs", READY_TIMEOUT_S)
        raise ApiError(503, "not ready: the database does not answer", code="database_unavailable") from None
    except Exception as exc:
        log.warning("readyz: the database check failed: %s", " ".join(str(exc).split())[:300])
        raise ApiError(503, "not ready: the database does not answer", code="database_unavailable") from None
    return schemas.Readiness()
