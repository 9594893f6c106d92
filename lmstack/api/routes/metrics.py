"""Routes: /metrics for Prometheus (text format). Behind auth like the rest: give Prometheus an API key
(`authorization: {credentials: lmsk_...}` in its scrape config)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from lmstack.api import schemas
from lmstack.api.deps import StateDep, authenticate
from lmstack.api.services.metrics import CONTENT_TYPE

router = APIRouter(tags=["metrics"], dependencies=[Depends(authenticate)])


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
    401: {"model": schemas.ErrorResponse, "description": "No valid login token or API key"},
})
async def metrics(state: StateDep) -> Response:
    """Gateway requests, latency, time to first token, tokens, dropped usage records, and replicas by
    deployment and state (read from the database now)."""
    body = await run_in_threadpool(state.metrics.exposition, database=state.database)
    return Response(body, media_type=CONTENT_TYPE)
