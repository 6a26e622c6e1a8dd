"""SSE streams: multi-chunk bodies ending at [DONE], for both transports, and how broken streams fail."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from client import AsyncClient, Client, errors
from client._sse import SSEParser
from client.types import CompletionChunk
from tests.client.conftest import Recorder, error_body, reply, sse

PIECES = ["Once", " upon", " a", " time"]
EVENT_STREAM = {"content-type": "text/event-stream"}


def completion_stream(*pieces: str, done: bool = True) -> bytes:
    events: list[dict[str, Any] | str] = [
        {"id": "cmpl-1", "object": "text_completion", "model": "d", "choices": [{"index": 0, "text": p}]}
        for p in pieces
    ]
    # A comment, an event name and a field we do not know must all be skipped.
    body = b": keep-alive\n\nevent: completion\n" + sse(*events)
    return body + (sse("[DONE]") + sse({"choices": [{"text": "after done"}]}) if done else b"")


def test_sync_stream_yields_every_chunk_until_done(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(200, content=completion_stream(*PIECES), headers=EVENT_STREAM))
    with make_client(server) as client:
        stream = client.completions("d", "Tell me", max_tokens=4, stream=True)
        chunks = list(stream)
    assert [c.text for c in chunks] == PIECES
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert stream.response.is_closed
    request = server.requests[0]
    assert request.headers["accept"] == "text/event-stream"
    assert json.loads(request.content) == {"model": "d", "prompt": "Tell me", "stream": True, "max_tokens": 4}


@pytest.mark.asyncio
async def test_async_stream_yields_every_chunk_until_done(
    make_async_client: Callable[..., AsyncClient],
) -> None:
    server = Recorder(reply(200, content=completion_stream(*PIECES), headers=EVENT_STREAM))
    async with make_async_client(server) as client:
        stream = await client.completions("d", "Tell me", stream=True)
        chunks = [chunk async for chunk in stream]
    assert [c.text for c in chunks] == PIECES
    assert stream.response.is_closed


def chat_stream() -> bytes:
    deltas = [{"role": "assistant"}, {"content": "Hi"}, {"content": " there"}, {}]
    events = [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d}]} for d in deltas]
    return sse(*events, "[DONE]").replace(b"\n", b"\r\n")  # CRLF line endings are SSE too


def test_sync_chat_stream(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(200, content=chat_stream(), headers=EVENT_STREAM))
    with make_client(server) as client:
        text = "".join(c.text for c in client.chat("d", [{"role": "user", "content": "hey"}], stream=True))
    assert text == "Hi there"
    assert server.requests[0].url.path == "/v1/chat/completions"


@pytest.mark.asyncio
async def test_async_chat_stream(make_async_client: Callable[..., AsyncClient]) -> None:
    server = Recorder(reply(200, content=chat_stream(), headers=EVENT_STREAM))
    async with make_async_client(server) as client:
        stream = await client.chat("d", [{"role": "user", "content": "hey"}], stream=True)
        text = "".join([c.text async for c in stream])
    assert text == "Hi there"


def test_stream_without_done_is_a_connection_error(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(200, content=completion_stream("a", "b", done=False), headers=EVENT_STREAM))
    seen: list[str] = []
    with make_client(server) as client, pytest.raises(errors.APIConnectionError, match=r"\[DONE\]"):
        seen.extend(c.text for c in client.completions("d", "p", stream=True))
    assert seen == ["a", "b"]


def test_error_event_mid_stream_raises(make_client: Callable[..., Client]) -> None:
    body = completion_stream("a", done=False) + sse(error_body("engine failed", type="server_error"))
    server = Recorder(reply(200, content=body, headers=EVENT_STREAM))
    with make_client(server) as client, pytest.raises(errors.APIError, match="engine failed") as caught:
        list(client.completions("d", "p", stream=True))
    assert caught.value.type == "server_error"


def test_stream_error_status_raises_at_call_time(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(404, json=error_body("model 'x' not found")))
    with make_client(server) as client, pytest.raises(errors.NotFoundError, match="model 'x' not found"):
        client.completions("x", "p", stream=True)


@pytest.mark.asyncio
async def test_async_stream_error_status_raises_at_call_time(
    make_async_client: Callable[..., AsyncClient],
) -> None:
    server = Recorder(reply(429, json=error_body("busy")))
    async with make_async_client(server, max_retries=0) as client:
        with pytest.raises(errors.RateLimitError):
            await client.completions("x", "p", stream=True)


def test_stream_retries_before_the_first_byte(
    make_client: Callable[..., Client], sleeps: list[float]
) -> None:
    server = Recorder(reply(503), reply(200, content=completion_stream("ok"), headers=EVENT_STREAM))
    with make_client(server) as client:
        assert [c.text for c in client.completions("d", "p", stream=True)] == ["ok"]
    assert sleeps == [0.5]


def test_connection_cut_mid_stream_is_a_connection_error(make_client: Callable[..., Client]) -> None:
    def body() -> Iterator[bytes]:
        yield completion_stream("a", done=False)
        raise httpx.RemoteProtocolError("peer closed connection")

    server = Recorder(lambda: httpx.Response(200, content=body(), headers=EVENT_STREAM))
    with make_client(server) as client, pytest.raises(errors.APIConnectionError, match="peer closed"):
        list(client.completions("d", "p", stream=True))


def test_parser_joins_multi_line_data_and_ignores_other_fields() -> None:
    parser = SSEParser(CompletionChunk, status_code=200)
    lines = ["id: 1", "retry: 100", 'data: {"choices":', 'data: [{"text": "x"}]}', ""]
    results = [parser.feed(line) for line in lines]
    assert results[:-1] == [None] * 4
    assert results[-1] is not None and results[-1].text == "x"
    assert parser.feed("data:[DONE]") is None and not parser.done
    assert parser.finish() is None and parser.done


def test_parser_rejects_non_json_data() -> None:
    parser = SSEParser(CompletionChunk, status_code=200)
    parser.feed("data: {not json")
    with pytest.raises(errors.APIResponseValidationError):
        parser.feed("")
