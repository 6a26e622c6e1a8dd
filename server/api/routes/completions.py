"""`POST /v1/completions`: text (or token id) prompts, plain or streamed."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import InferenceAuth, RuntimeDep
from server.api.generation import Event, start_job
from server.api.schemas import Completion, CompletionChoice, CompletionRequest, Usage
from server.api.sse import SSE_HEADERS, stream_job
from server.errors import InvalidRequestError
from server.runtime import Runtime

router = APIRouter(tags=["completions"], dependencies=[InferenceAuth])


def _prompts(body: CompletionRequest, runtime: Runtime) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [runtime.engine.encode_prompt(prompt)]
    if not prompt:
        raise InvalidRequestError("prompt is empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [runtime.engine.encode_prompt(str(p)) for p in prompt]
    token_lists: list[object] = [prompt] if all(isinstance(p, int) for p in prompt) else list(prompt)
    out: list[list[int]] = []
    vocab = runtime.engine.vocab_size
    for ids in token_lists:
        if not isinstance(ids, list) or any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab})", param="prompt")
        out.append([int(t) for t in ids])
    return out


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request, runtime: RuntimeDep
) -> Completion | StreamingResponse:
    if body.echo:
        raise InvalidRequestError("echo is not supported by this server", param="echo")
    job = start_job(runtime, body, _prompts(body, runtime), body.max_tokens)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=completion_id, created=created, model=body.model, choices=choices, usage=usage)

    if body.stream:

        def render(event: Event) -> Completion | None:
            if event.result is not None:
                return chunk(
                    [CompletionChoice(index=event.index, text="", finish_reason=event.result.finish_reason)]
                )
            return chunk([CompletionChoice(index=event.index, text=event.text)]) if event.text else None

        usage_chunk = (lambda usage: chunk([], usage)) if body.include_usage else None
        return StreamingResponse(
            stream_job(job, render, usage_chunk=usage_chunk),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    results = await job.results(request)
    choices = [
        CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)
    ]
    return chunk(choices, job.usage(results))
