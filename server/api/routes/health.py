"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.errors import error_response

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """200 while the process lives."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(request: Request) -> JSONResponse | dict[str, str]:
    """200 once the base model is loaded and the worker runs; 503 (with the reason) before and after."""
    state = request.app.state
    runtime = state.runtime
    if runtime is None or not runtime.scheduler.alive:
        reason = state.load_error or ("shutting down" if state.stopping else "the base model is loading")
        return error_response(
            503, f"not ready: {reason}", "server_error", code="not_ready",
            headers={"Retry-After": str(state.settings.retry_after_s)},
        )  # fmt: skip
    return {"status": "ready", "model": runtime.base_id}
