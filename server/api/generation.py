"""From a validated request to results: submit one engine request per choice, gather or stream their events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import Request

from server.api.schemas import SamplingRequest, Usage
from server.engine.request import Finished, GenerationRequest, SamplingParams
from server.errors import InvalidRequestError, RequestCancelledError
from server.runtime import Runtime

_DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Event:
    """Something that happened to choice `index`: new text, its end, or its failure."""

    index: int
    text: str = ""
    result: Finished | None = None
    error: BaseException | None = None


class _Sink:
    """Hands engine callbacks (worker thread) to the request's asyncio queue, never blocking the worker."""

    def __init__(self, job: Job, index: int) -> None:
        self._job = job
        self._index = index

    def on_start(self) -> None:
        self._job.first_token()

    def on_text(self, text: str) -> None:
        self._job.post(Event(self._index, text=text))

    def on_finish(self, result: Finished) -> None:
        self._job.record(result)
        self._job.post(Event(self._index, result=result))

    def on_error(self, error: BaseException) -> None:
        self._job.post(Event(self._index, error=error))


class Job:
    """One HTTP request's generation: one engine request per choice, all reporting to one queue."""

    def __init__(
        self,
        runtime: Runtime,
        model: str,
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        prompt_tokens: int,
    ) -> None:
        self.runtime = runtime
        self.model = model
        self.started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._ttft_seen = False
        self.requests = [
            GenerationRequest(model, list(prompt), p, _Sink(self, i))
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
        ]
        self.prompt_tokens = prompt_tokens  # each distinct prompt once, however many samples of it
        self._open = len(self.requests)  # choices neither finished nor failed

    def submit(self) -> None:
        self.runtime.scheduler.submit(self.requests)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def post(self, event: Event) -> None:  # worker thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
            self.cancel()

    def first_token(self) -> None:  # worker thread; there is one, so no race
        if not self._ttft_seen:
            self._ttft_seen = True
            self.runtime.metrics.ttft_seconds.labels(self.model).observe(time.monotonic() - self.started)

    async def events(self) -> AsyncIterator[Event]:
        """Every event until each choice has finished or failed."""
        while self._open:
            yield self._account(await self._queue.get())

    async def results(self, http: Request) -> list[Finished]:
        """Wait for every choice (cancelling them if the client goes away); raises the first error."""
        results: dict[int, Finished] = {}
        try:
            while self._open:
                try:
                    event = self._account(await asyncio.wait_for(self._queue.get(), _DISCONNECT_POLL_S))
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise RequestCancelledError("the client disconnected") from None
                    continue
                if event.error is not None:
                    raise event.error
                if event.result is not None:
                    results[event.index] = event.result
        finally:
            self.cancel()  # no-op for finished choices
        return [results[i] for i in range(len(self.requests))]

    def usage(self, results: Sequence[Finished]) -> Usage:
        completion = sum(r.completion_tokens for r in results)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def record(self, result: Finished) -> None:  # worker thread: counted even if nobody listens any more
        metrics = self.runtime.metrics
        metrics.requests.labels(self.model, result.finish_reason).inc()
        metrics.request_seconds.labels(self.model).observe(time.monotonic() - self.started)

    def _account(self, event: Event) -> Event:
        if event.result is not None or event.error is not None:
            self._open -= 1
        return event


def start_job(
    runtime: Runtime,
    body: SamplingRequest,
    prompts: Sequence[list[int]],
    max_tokens: int | None,
) -> Job:
    """Check the request against the model and limits, then queue it; choice i*n + j = prompt i, sample j."""
    model, n, seed, stop = body.model, body.n, body.seed, body.stop_list
    runtime.registry.resolve(model)  # 404 before any work
    settings = runtime.settings
    if body.logprobs not in (None, False, 0):
        raise InvalidRequestError("logprobs are not supported by this server", param="logprobs")
    if len(stop) > settings.max_stop_sequences:
        raise InvalidRequestError(f"at most {settings.max_stop_sequences} stop sequences", param="stop")
    all_prompts: list[list[int]] = []
    params: list[SamplingParams] = []
    for prompt in prompts:
        limit = runtime.engine.check_length(len(prompt), max_tokens, settings.default_max_tokens)
        for j in range(n):
            sample_seed = None if seed is None else seed + j
            all_prompts.append(prompt)
            params.append(
                SamplingParams(limit, body.temperature, body.top_p, sample_seed, tuple(stop), body.ignore_eos)
            )
    job = Job(runtime, model, all_prompts, params, sum(len(p) for p in prompts))
    job.submit()
    return job
