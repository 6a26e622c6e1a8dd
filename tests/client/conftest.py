"""Fixtures for the client tests: mocked servers (httpx.MockTransport), recorded sleeps, a clean env."""

from __future__ import annotations

import email.policy
import json
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from typing import Any

import httpx
import pytest

from client import AsyncClient, Client

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The developer's own DELTASERVE_* variables must not leak into the tests."""
    import os

    for name in list(os.environ):
        if name.startswith("DELTASERVE_"):
            monkeypatch.delenv(name)
    yield


def error_body(
    message: str, type: str = "invalid_request_error", param: Any = None, code: Any = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(*events: dict[str, Any] | str) -> bytes:
    """An SSE body: each event a `data:` line and a blank line; strings are sent verbatim as data."""
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


Answer = Callable[[], httpx.Response] | Exception


def reply(status: int = 200, **kwargs: Any) -> Callable[[], httpx.Response]:
    """A fresh `httpx.Response(status, **kwargs)` each time the mock server answers with it."""
    return lambda: httpx.Response(status, **kwargs)


def multipart_fields(request: httpx.Request, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The form fields of a multipart/form-data request: name -> (filename, content)."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert message.is_multipart()
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        fields[str(name)] = (part.get_filename(), payload)
    return fields


class Recorder:
    """A mock server: answers from a queue (the last answer repeats) and keeps every request it saw."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.content)  # MockTransport has already read the (streamed) body
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(sleeps: list[float]) -> Callable[..., Client]:
    def make(handler: Handler, **kwargs: Any) -> Client:
        kwargs.setdefault("server", "http://deltaserve.test")
        return Client(transport=httpx.MockTransport(handler), sleep=sleeps.append, **kwargs)

    return make


@pytest.fixture
def make_async_client(sleeps: list[float]) -> Callable[..., AsyncClient]:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    def make(handler: Handler, **kwargs: Any) -> AsyncClient:
        kwargs.setdefault("server", "http://deltaserve.test")
        return AsyncClient(transport=httpx.MockTransport(handler), sleep=sleep, **kwargs)

    return make
