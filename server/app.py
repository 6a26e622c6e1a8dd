"""The FastAPI app factory: routes, error translation, and a lifespan that loads the base once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.errors import install_error_handlers
from server.api.middleware import RequestIdMiddleware
from server.api.routes import chat, completions, deltas, health, metrics, models
from server.engine.threads import on_fresh_thread
from server.metrics import ServerMetrics
from server.runtime import build_runtime
from server.settings import ServerSettings

log = logging.getLogger(__name__)


async def _load(app: FastAPI, settings: ServerSettings) -> None:
    """Build the runtime off the event loop, so /health answers (and /ready says 503) while it loads."""
    try:
        # on a thread that ends with the load (server.engine.threads: one OpenMP pool, the worker's)
        app.state.runtime = await asyncio.to_thread(
            on_fresh_thread, build_runtime, settings, app.state.metrics
        )
    except Exception as exc:  # reported by /ready (503 with the reason) and in the log; nothing is served
        log.exception("could not load the base model from %s", settings.base)
        app.state.load_error = f"{type(exc).__name__}: {exc}"
    else:
        log.info("ready: serving %s and the deltas in %s", app.state.runtime.base_id, settings.store)


def create_app(settings: ServerSettings) -> FastAPI:
    """A deltaserve app for `settings`; the base model loads when the app starts (its lifespan).

    Example:
        >>> app = create_app(ServerSettings(base=Path("models/base"), store=Path("deltas")))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = None
        app.state.load_error = None
        app.state.stopping = False
        loading = asyncio.create_task(_load(app, settings))
        try:
            yield
        finally:
            app.state.stopping = True
            await loading  # a load in progress cannot be interrupted; let it finish, then stop it
            runtime = app.state.runtime
            if runtime is not None:
                await asyncio.to_thread(runtime.scheduler.stop, settings.drain_timeout_s)
                runtime.scheduler.loader.close()  # background reads still queued are dropped

    app = FastAPI(
        title="deltaserve",
        summary="Many fine-tunes of one base model, served as exact hot-swapped sparse deltas.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServerMetrics()
    app.state.runtime = None
    app.state.load_error = None
    app.state.stopping = False
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    for module in (health, metrics, models, completions, chat, deltas):
        app.include_router(module.router)
    return app
