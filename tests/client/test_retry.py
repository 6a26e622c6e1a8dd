"""Retry policy: 429/503 and connection errors are retried, honoring Retry-After, never an upload twice."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from client import AsyncClient, Client, errors
from client._base import RetryPolicy, parse_retry_after
from client.settings import ClientSettings
from tests.client.conftest import Recorder, error_body, multipart_fields, reply

MODELS = {"object": "list", "data": [{"id": "base", "object": "model"}]}
BUSY = error_body("queue full", type="rate_limit_error")


def test_retry_after_is_honored(make_client: Callable[..., Client], sleeps: list[float]) -> None:
    server = Recorder(
        reply(429, json=BUSY, headers={"Retry-After": "2"}),
        reply(503, json=BUSY, headers={"Retry-After": "0.5"}),
        reply(200, json=MODELS),
    )
    with make_client(server, max_retries=3) as client:
        assert client.models().data[0].id == "base"
    assert sleeps == [2.0, 0.5]
    assert len(server.requests) == 3


def test_retry_after_is_capped(make_client: Callable[..., Client], sleeps: list[float]) -> None:
    server = Recorder(reply(503, headers={"Retry-After": "3600"}), reply(200, json=MODELS))
    settings = ClientSettings(max_retry_delay=5)
    with make_client(server, settings=settings) as client:
        client.models()
    assert sleeps == [5.0]


def test_exponential_backoff_without_retry_after(
    make_client: Callable[..., Client], sleeps: list[float]
) -> None:
    server = Recorder(reply(503), reply(429), reply(503), reply(200, json=MODELS))
    with make_client(server, max_retries=3) as client:
        client.models()
    assert sleeps == [0.5, 1.0, 2.0]


def test_gives_up_after_max_retries(make_client: Callable[..., Client], sleeps: list[float]) -> None:
    server = Recorder(reply(503, json=error_body("loading"), headers={"Retry-After": "1"}))
    with (
        make_client(server, max_retries=2) as client,
        pytest.raises(errors.ServiceUnavailableError) as caught,
    ):
        client.models()
    assert len(server.requests) == 3
    assert sleeps == [1.0, 1.0]
    assert (caught.value.message, caught.value.retry_after) == ("loading", 1.0)


def test_max_retries_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., Client], sleeps: list[float]
) -> None:
    monkeypatch.setenv("DELTASERVE_MAX_RETRIES", "0")
    server = Recorder(reply(429))
    with make_client(server) as client, pytest.raises(errors.RateLimitError):
        client.models()
    assert (len(server.requests), sleeps) == (1, [])


@pytest.mark.parametrize("status", [400, 404, 409, 500])
def test_other_errors_are_not_retried(
    status: int, make_client: Callable[..., Client], sleeps: list[float]
) -> None:
    server = Recorder(reply(status, json=error_body("no")))
    with make_client(server, max_retries=5) as client, pytest.raises(errors.APIError):
        client.models()
    assert (len(server.requests), sleeps) == (1, [])


def test_connection_errors_are_retried_then_reported(
    make_client: Callable[..., Client], sleeps: list[float]
) -> None:
    server = Recorder(httpx.ConnectError("connection refused"))
    with make_client(server, max_retries=2) as client, pytest.raises(errors.APIConnectionError) as caught:
        client.models()
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]
    assert "http://deltaserve.test" in str(caught.value)
    assert "connection refused" in str(caught.value)


def test_a_read_timeout_on_a_query_is_retried(
    make_client: Callable[..., Client], sleeps: list[float]
) -> None:
    server = Recorder(httpx.ReadTimeout("slow"), reply(200, json=MODELS))
    with make_client(server) as client:
        client.models()
    assert sleeps == [0.5]


@pytest.fixture
def delta_file(tmp_path: Path) -> Path:
    path = tmp_path / "d.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 10)
    return path


UPLOADED = {"name": "d", "method": "darex-q"}


def test_upload_is_not_resent_once_the_body_may_have_left(
    make_client: Callable[..., Client], sleeps: list[float], delta_file: Path
) -> None:
    server = Recorder(httpx.ReadError("connection reset"), reply(201, json=UPLOADED))
    with make_client(server, max_retries=3) as client, pytest.raises(errors.APIConnectionError):
        client.upload_delta(delta_file, "d")
    assert (len(server.requests), sleeps) == (1, [])


def test_upload_is_retried_when_nothing_was_sent(
    make_client: Callable[..., Client], sleeps: list[float], delta_file: Path
) -> None:
    server = Recorder(httpx.ConnectError("refused"), reply(201, json=UPLOADED))
    with make_client(server) as client:
        assert client.upload_delta(delta_file, "d").name == "d"
    assert (len(server.requests), sleeps) == (2, [0.5])


def test_upload_is_retried_on_429_with_the_whole_file_again(
    make_client: Callable[..., Client], sleeps: list[float], delta_file: Path
) -> None:
    server = Recorder(reply(429, headers={"Retry-After": "1"}), reply(201, json=UPLOADED))
    with make_client(server) as client:
        client.upload_delta(delta_file, "d")
    assert sleeps == [1.0]
    sent = [multipart_fields(r, b) for r, b in zip(server.requests, server.bodies, strict=True)]
    assert sent[0] == sent[1] == {"name": (None, b"d"), "file": ("d.safetensors", delta_file.read_bytes())}


def test_ready_does_not_retry_not_ready(make_client: Callable[..., Client], sleeps: list[float]) -> None:
    server = Recorder(reply(503, json=error_body("loading the base model")))
    with make_client(server) as client:
        assert client.ready() is False
    assert (len(server.requests), sleeps) == (1, [])


@pytest.mark.asyncio
async def test_async_client_uses_the_same_policy(
    make_async_client: Callable[..., AsyncClient], sleeps: list[float]
) -> None:
    server = Recorder(
        httpx.ConnectError("refused"),
        reply(429, headers={"Retry-After": "3"}),
        reply(200, json=MODELS),
    )
    async with make_async_client(server) as client:
        models = await client.models()
    assert models.data[0].id == "base"
    assert sleeps == [0.5, 3.0]


@pytest.mark.asyncio
async def test_async_client_gives_up_after_max_retries(
    make_async_client: Callable[..., AsyncClient], sleeps: list[float]
) -> None:
    server = Recorder(reply(503))
    async with make_async_client(server, max_retries=1) as client:
        with pytest.raises(errors.ServiceUnavailableError):
            await client.list_deltas()
    assert (len(server.requests), sleeps) == (2, [0.5])


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("5", 5.0), ("1.5", 1.5), ("-3", 0.0), ("soon", None), ("nan", None), ("inf", None)],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_parse_retry_after_http_date() -> None:
    in_a_minute = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=60), usegmt=True)
    assert 55 <= (parse_retry_after(in_a_minute) or 0) <= 60
    past = format_datetime(datetime(2000, 1, 1, tzinfo=timezone.utc), usegmt=True)
    assert parse_retry_after(past) == 0.0


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retries=10, backoff=0.5, max_delay=3.0)
    assert [policy.backoff_delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
