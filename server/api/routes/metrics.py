"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    runtime = request.app.state.runtime
    if runtime is not None:
        runtime.refresh_metrics()
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
