"""Routes: /metrics for Prometheus (text format). Behind auth like the rest: give Prometheus an API key with
the "metrics" scope (`lmstack keys create --scope metrics`; `authorization: {credentials: lmsk_...}` in its
scrape config). A key limited to some models sees only their series."""

from __future__ import annotations

from fastapi import APIRouter, Response

from lmstack.api import schemas
from lmstack.api.deps import MetricsPrincipal, StateDep
from lmstack.api.services.metrics import CONTENT_TYPE

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
    **schemas.errors(401, (403, "An API key without the 'metrics' scope"), 503),
})
async def metrics(principal: MetricsPrincipal, state: StateDep) -> Response:
    """Gateway requests, latency, time to first token, tokens, dropped usage records, and replicas by
    deployment and state (read from the database now)."""
    body = await state.metrics.render(database=state.database, view=principal.view)
    return Response(body, media_type=CONTENT_TYPE)
