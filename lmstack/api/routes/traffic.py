"""Routes: GET /api/traffic, the gateway's requests, errors, tokens and time to first token per model over the
last 15 minutes in 10-second buckets (the dashboard's charts). Read-only, behind the status API's credentials:
a login, or an API key with the "status" scope; a key limited to some models sees only those.

The series lives in memory (services/metrics.Traffic), in the supervisor when the server runs several processes
(api/hub): it counts the requests answered since the server started. Usage over longer spans is in the
database (/api/usage).
"""

from __future__ import annotations

from fastapi import APIRouter

from lmstack.api import schemas
from lmstack.api.deps import StateDep, StatusPrincipal

router = APIRouter(prefix="/api", tags=["status"], responses=schemas.errors(
    401, (403, "An API key without the 'status' scope"), 503))


@router.get("/traffic", response_model=schemas.Traffic)
async def traffic(principal: StatusPrincipal, state: StateDep) -> schemas.Traffic:
    """Requests, errors (status 400 or more), prompt and completion tokens, and the mean time to first token
    per model and 10-second bucket over the last 15 minutes, since the server started."""
    return await state.metrics.traffic_snapshot(principal.view)
