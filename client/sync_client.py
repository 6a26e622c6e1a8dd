"""The blocking client: a thin `httpx.Client` transport over the shared request layer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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


class Stream(Generic[ChunkT]):
    """The chunks of a streamed completion, as they arrive; the connection closes at the end.

    Example:
        >>> for chunk in client.completions("my-delta", "Once", stream=True):
        ...     print(chunk.text, end="")
    """

    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT], config: ClientConfig) -> None:
        self.response = response
        self._parser = SSEParser(chunk_type, status_code=response.status_code)
        self._config = config

    def __iter__(self) -> Iterator[ChunkT]:
        try:
            for line in self.response.iter_lines():
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
            self.response.close()

    def close(self) -> None:
        """Stop early and release the connection."""
        self.response.close()

    def __enter__(self) -> Stream[ChunkT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client:
    """Blocking deltaserve client; every setting left out comes from `DELTASERVE_*` (`ClientSettings`).

    Example:
        >>> with Client("http://127.0.0.1:8000", api_key="sk-...") as client:
        ...     print([m.id for m in client.models().data])
        ...     print(client.completions("my-delta", "Hello", max_tokens=8).text)
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
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = ClientConfig.resolve(
            server,
            api_key=api_key,
            admin_key=admin_key,
            timeout=timeout,
            max_retries=max_retries,
            settings=settings,
        )
        self._http = httpx.Client(transport=transport, **self.config.http_options())
        self._sleep = sleep

    # --- transport -------------------------------------------------------------------------------

    def _send(self, spec: RequestSpec) -> httpx.Response:
        attempt = 0
        while True:
            try:
                with open_request(self._http, self.config, spec) as request:
                    response = self._http.send(request, stream=spec.stream)
            except httpx.TransportError as exc:
                delay = self.config.retry.after_error(exc, attempt, spec)
                if delay is None:
                    raise connection_error(exc, self.config) from exc
            else:
                delay = self.config.retry.after_response(response, attempt, spec)
                if delay is None:
                    return response
                response.close()
            self._sleep(delay)
            attempt += 1

    def _call(self, spec: RequestSpec, model: type[ModelT]) -> ModelT:
        return parse_response(self._send(spec), model)

    def _stream(self, spec: RequestSpec, chunk_type: type[ChunkT]) -> Stream[ChunkT]:
        response = self._send(spec)
        if response.is_error:
            response.read()
            response.close()
            raise error_from_response(response)
        return Stream(response, chunk_type, self.config)

    # --- inference -------------------------------------------------------------------------------

    def models(self) -> ModelList:
        """`GET /v1/models`: the base model and every delta (`parent` = the base's id)."""
        return self._call(api.MODELS, ModelList)

    @overload
    def completions(
        self, model: str, prompt: str, *, stream: Literal[False] = False, **sampling: Unpack[SamplingParams]
    ) -> Completion: ...
    @overload
    def completions(
        self, model: str, prompt: str, *, stream: Literal[True], **sampling: Unpack[SamplingParams]
    ) -> Stream[CompletionChunk]: ...
    def completions(
        self, model: str, prompt: str, *, stream: bool = False, **sampling: Unpack[SamplingParams]
    ) -> Completion | Stream[CompletionChunk]:
        """`POST /v1/completions`; `stream=True` returns an iterator of chunks."""
        spec = api.completion(model, prompt, stream=stream, **sampling)
        return self._stream(spec, CompletionChunk) if stream else self._call(spec, Completion)

    @overload
    def chat(
        self,
        model: str,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        stream: Literal[False] = False,
        **sampling: Unpack[SamplingParams],
    ) -> ChatCompletion: ...
    @overload
    def chat(
        self,
        model: str,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        stream: Literal[True],
        **sampling: Unpack[SamplingParams],
    ) -> Stream[ChatCompletionChunk]: ...
    def chat(
        self,
        model: str,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        stream: bool = False,
        **sampling: Unpack[SamplingParams],
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """`POST /v1/chat/completions`; `stream=True` returns an iterator of chunks."""
        spec = api.chat(model, messages, stream=stream, **sampling)
        return self._stream(spec, ChatCompletionChunk) if stream else self._call(spec, ChatCompletion)

    # --- deltas ----------------------------------------------------------------------------------

    def upload_delta(
        self, path: str | Path, name: str, *, progress: ProgressCallback | None = None
    ) -> DeltaInfo:
        """`POST /v1/deltas` (admin key): stream a `.safetensors` delta from disk; returns its summary."""
        return self._call(api.upload_delta(path, name, progress), DeltaInfo)

    def list_deltas(self) -> DeltaList:
        """`GET /v1/deltas`: every stored delta."""
        return self._call(api.DELTAS, DeltaList)

    def get_delta(self, name: str) -> DeltaInfo:
        """`GET /v1/deltas/{name}`: manifest, size, density, method, q, residency."""
        return self._call(api.get_delta(name), DeltaInfo)

    def delete_delta(self, name: str) -> None:
        """`DELETE /v1/deltas/{name}` (admin key); in-flight requests for it finish first."""
        check_response(self._send(api.delete_delta(name)))

    # --- probes ----------------------------------------------------------------------------------

    def health(self) -> bool:
        """`GET /health`: True while the server process lives."""
        return probe_result(self._send(api.HEALTH))

    def ready(self) -> bool:
        """`GET /ready`: True once the base model is loaded, False while it is not (503)."""
        return probe_result(self._send(api.READY))

    # --- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
