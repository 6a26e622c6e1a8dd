"""The asyncio client: a thin `httpx.AsyncClient` transport over the shared request layer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, overload

import httpx

from client import _endpoints as api
from client._base import (
    ClientConfig,
    ModelT,
    ProgressCallback,
    RequestSpec,
    check_response,
    connection_error,
    error_from_response,
    open_request,
    parse_response,
    probe_result,
)
from client._sse import ChunkT, SSEParser
from client.settings import ClientSettings
from client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    CompletionChunk,
    DeltaInfo,
    DeltaList,
    ModelList,
)

if TYPE_CHECKING:
    from typing import Unpack

    from client.types import SamplingParams


class AsyncStream(Generic[ChunkT]):
    """The chunks of a streamed completion, as they arrive; the connection closes at the end.

    Example:
        >>> async for chunk in await client.completions("my-delta", "Once", stream=True):
        ...     print(chunk.text, end="")
    """

    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT], config: ClientConfig) -> None:
        self.response = response
        self._parser = SSEParser(chunk_type, status_code=response.status_code)
        self._config = config

    async def __aiter__(self) -> AsyncIterator[ChunkT]:
        try:
            async for line in self.response.aiter_lines():
                chunk = self._parser.feed(line)
                if chunk is not None:
                    yield chunk
                if self._parser.done:
                    return
            last = self._parser.finish()
            if last is not None:
                yield last
        except httpx.TransportError as exc:
            raise connection_error(exc, self._config) from exc
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        """Stop early and release the connection."""
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[ChunkT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncClient:
    """asyncio deltaserve client, the same methods as `Client` awaited; settings left out come from
    `DELTASERVE_*` (`ClientSettings`).

    Example:
        >>> async with AsyncClient("http://127.0.0.1:8000", api_key="sk-...") as client:
        ...     print((await client.completions("my-delta", "Hello", max_tokens=8)).text)
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        settings: ClientSettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = ClientConfig.resolve(
            server,
            api_key=api_key,
            admin_key=admin_key,
            timeout=timeout,
            max_retries=max_retries,
            settings=settings,
        )
        self._http = httpx.AsyncClient(transport=transport, **self.config.http_options())
        self._sleep = sleep

    # --- transport -------------------------------------------------------------------------------

    async def _send(self, spec: RequestSpec) -> httpx.Response:
        attempt = 0
        while True:
            try:
                with open_request(self._http, self.config, spec) as request:
                    response = await self._http.send(request, stream=spec.stream)
            except httpx.TransportError as exc:
                delay = self.config.retry.after_error(exc, attempt, spec)
                if delay is None:
                    raise connection_error(exc, self.config) from exc
            else:
                delay = self.config.retry.after_response(response, attempt, spec)
                if delay is None:
                    return response
                await response.aclose()
            await self._sleep(delay)
            attempt += 1

    async def _call(self, spec: RequestSpec, model: type[ModelT]) -> ModelT:
        return parse_response(await self._send(spec), model)

    async def _stream(self, spec: RequestSpec, chunk_type: type[ChunkT]) -> AsyncStream[ChunkT]:
        response = await self._send(spec)
        if response.is_error:
            await response.aread()
            await response.aclose()
            raise error_from_response(response)
        return AsyncStream(response, chunk_type, self.config)

    # --- inference -------------------------------------------------------------------------------

    async def models(self) -> ModelList:
        """`GET /v1/models`: the base model and every delta (`parent` = the base's id)."""
        return await self._call(api.MODELS, ModelList)

    @overload
    async def completions(
        self, model: str, prompt: str, *, stream: Literal[False] = False, **sampling: Unpack[SamplingParams]
    ) -> Completion: ...
    @overload
    async def completions(
        self, model: str, prompt: str, *, stream: Literal[True], **sampling: Unpack[SamplingParams]
    ) -> AsyncStream[CompletionChunk]: ...
    async def completions(
        self, model: str, prompt: str, *, stream: bool = False, **sampling: Unpack[SamplingParams]
    ) -> Completion | AsyncStream[CompletionChunk]:
        """`POST /v1/completions`; `stream=True` returns an async iterator of chunks."""
        spec = api.completion(model, prompt, stream=stream, **sampling)
        if stream:
            return await self._stream(spec, CompletionChunk)
        return await self._call(spec, Completion)

    @overload
    async def chat(
        self,
        model: str,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        stream: Literal[False] = False,
        **sampling: Unpack[SamplingParams],
    ) -> ChatCompletion: ...
    @overload
    async def chat(
        self,
        model: str,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        stream: Literal[True],
        **sampling: Unpack[SamplingParams],
    ) -> AsyncStream[ChatCompletionChunk]: ...
    async def chat(
        self,
        model: str,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        stream: bool = False,
        **sampling: Unpack[SamplingParams],
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """`POST /v1/chat/completions`; `stream=True` returns an async iterator of chunks."""
        spec = api.chat(model, messages, stream=stream, **sampling)
        if stream:
            return await self._stream(spec, ChatCompletionChunk)
        return await self._call(spec, ChatCompletion)

    # --- deltas ----------------------------------------------------------------------------------

    async def upload_delta(
        self, path: str | Path, name: str, *, progress: ProgressCallback | None = None
    ) -> DeltaInfo:
        """`POST /v1/deltas` (admin key): stream a `.safetensors` delta from disk; returns its summary."""
        # httpx's multipart encoder reads the file in 64 KiB blocking reads: short enough for the loop.
        return await self._call(api.upload_delta(path, name, progress), DeltaInfo)

    async def list_deltas(self) -> DeltaList:
        """`GET /v1/deltas`: every stored delta."""
        return await self._call(api.DELTAS, DeltaList)

    async def get_delta(self, name: str) -> DeltaInfo:
        """`GET /v1/deltas/{name}`: manifest, size, density, method, q, residency."""
        return await self._call(api.get_delta(name), DeltaInfo)

    async def delete_delta(self, name: str) -> None:
        """`DELETE /v1/deltas/{name}` (admin key); in-flight requests for it finish first."""
        check_response(await self._send(api.delete_delta(name)))

    # --- probes ----------------------------------------------------------------------------------

    async def health(self) -> bool:
        """`GET /health`: True while the server process lives."""
        return probe_result(await self._send(api.HEALTH))

    async def ready(self) -> bool:
        """`GET /ready`: True once the base model is loaded, False while it is not (503)."""
        return probe_result(await self._send(api.READY))

    # --- lifetime --------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
