"""Server-sent events for both transports: `data:` lines in, chunk models out, ending at `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from client._base import str_or_none
from client.errors import APIConnectionError, APIError, APIResponseValidationError

ChunkT = TypeVar("ChunkT", bound=BaseModel)

DONE = "[DONE]"


class SSEParser(Generic[ChunkT]):
    """Feed it the body's lines one by one; it returns a chunk whenever an event completes.

    Events follow the SSE rules: `data:` lines accumulate until a blank line dispatches them; comments
    (`:`) and other fields (`event:`, `id:`, `retry:`) are ignored. An `{"error": ...}` event raises.

    Example:
        >>> parser = SSEParser(CompletionChunk, status_code=200)
        >>> parser.feed('data: {"choices": [{"text": "Hi"}]}') is None
        True
        >>> parser.feed("").text
        'Hi'
    """

    def __init__(self, chunk_type: type[ChunkT], *, status_code: int) -> None:
        self._chunk_type = chunk_type
        self._status_code = status_code
        self._data: list[str] = []
        self.done = False  # True once `data: [DONE]` arrived; the caller stops reading

    def feed(self, line: str) -> ChunkT | None:
        """One line of the body, without its line ending."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def finish(self) -> ChunkT | None:
        """The body ended: dispatch a last unterminated event, and fail if `[DONE]` never came."""
        chunk = self._dispatch()
        if not self.done:
            raise APIConnectionError("the stream ended before 'data: [DONE]' (connection cut?)")
        return chunk

    def _dispatch(self) -> ChunkT | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        if data.strip() == DONE:
            self.done = True
            return None
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as exc:
            raise APIResponseValidationError(f"stream event is not JSON: {data[:200]!r}") from exc
        if isinstance(payload, Mapping) and "error" in payload:
            raise _error_from_event(payload, self._status_code)
        try:
            return self._chunk_type.model_validate(payload)
        except ValidationError as exc:
            raise APIResponseValidationError(f"unexpected stream event: {exc}") from exc


def _error_from_event(payload: Mapping[str, Any], status_code: int) -> APIError:
    # The status line already said 200 when a generation fails mid-stream; the event carries the error.
    error = payload.get("error")
    body: Mapping[str, Any] = error if isinstance(error, Mapping) else {}
    return APIError(
        status_code,
        str(body.get("message") or error),
        type=str_or_none(body.get("type")),
        param=str_or_none(body.get("param")),
        code=str_or_none(body.get("code")),
    )
