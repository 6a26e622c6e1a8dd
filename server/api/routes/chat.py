"""`POST /v1/chat/completions`: messages rendered with the tokenizer's chat template, plain or streamed."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import InferenceAuth, RuntimeDep
from server.api.generation import Event, start_job
from server.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    Usage,
)
from server.api.sse import SSE_HEADERS, stream_job

router = APIRouter(tags=["chat"], dependencies=[InferenceAuth])


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, runtime: RuntimeDep
) -> ChatCompletion | StreamingResponse:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    job = start_job(
        runtime, body, [runtime.engine.encode_chat(messages)], body.max_completion_tokens or body.max_tokens
    )
    chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=chat_id, created=created, model=body.model, choices=choices, usage=usage
            )

        def render(event: Event) -> ChatCompletionChunk | None:
            if event.result is not None:
                finish = ChatChunkChoice(
                    index=event.index, delta=ChoiceDelta(), finish_reason=event.result.finish_reason
                )
                return chunk([finish])
            if not event.text:
                return None
            return chunk([ChatChunkChoice(index=event.index, delta=ChoiceDelta(content=event.text))])

        opening = [
            chunk([ChatChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))])
            for i in range(len(job.requests))
        ]
        usage_chunk = (lambda usage: chunk([], usage)) if body.include_usage else None
        return StreamingResponse(
            stream_job(job, render, opening=opening, usage_chunk=usage_chunk),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    results = await job.results(request)
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
        for i, r in enumerate(results)
    ]
    return ChatCompletion(
        id=chat_id, created=created, model=body.model, choices=choices, usage=job.usage(results)
    )
