"""`GET /healthz`: 200 when PostgreSQL and Temporal answer, 503 (degraded) otherwise."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from operations.health import health_report
from webhooks.deps import SessionsDep, TemporalDep

router = APIRouter()


@router.get("/healthz")
async def healthz(sessions: SessionsDep, client: TemporalDep) -> JSONResponse:
    """The report of operations.health (also tries to reach Temporal again when it was down)."""
    report, healthy = await health_report(sessions, client)
    return JSONResponse(report, status_code=200 if healthy else 503)
