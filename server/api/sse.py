"""Server-sent events: OpenAI's `data: {chunk}` lines, ending in `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

from pydantic import BaseModel

from server.api.errors import spec_for
from server.api.generation import Event, Job
from server.api.schemas import ErrorBody, ErrorDetail, Usage
from server.engine.request import Finished
from server.errors import ServerError

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def error_event(exc: BaseException) -> str:
    """An error after the 200 header went out can only travel in-band, in OpenAI's error shape."""
    spec = spec_for(exc)
    message = exc.message if isinstance(exc, ServerError) else str(exc) or type(exc).__name__
    return sse(ErrorBody(error=ErrorDetail(message=message, type=spec.type, code=spec.code)))


async def stream_job(
    job: Job,
    render: Callable[[Event], BaseModel | None],
    *,
    opening: Sequence[BaseModel] = (),
    usage_chunk: Callable[[Usage], BaseModel] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of a streamed job; closing it (client gone) cancels the job's work."""
    results: list[Finished] = []
    failed = False
    try:
        for chunk in opening:
            yield sse(chunk)
        async for event in job.events():
            if event.error is not None:
                yield error_event(event.error)
                failed = True
                break
            if event.result is not None:
                results.append(event.result)
            rendered = render(event)
            if rendered is not None:
                yield sse(rendered)
        if usage_chunk is not None and not failed:
            yield sse(usage_chunk(job.usage(results)))
        yield DONE
    finally:
        job.cancel()  # no-op when every choice finished
