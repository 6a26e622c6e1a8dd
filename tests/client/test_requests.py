"""What goes on the wire: routes, JSON bodies, auth headers, the multipart upload; and what is parsed back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from client import AsyncClient, Client, errors
from client.settings import ClientSettings
from client.types import ChatMessage
from tests.client.conftest import Recorder, error_body, multipart_fields, reply

MODELS = {
    "object": "list",
    "data": [
        {"id": "smollm2", "object": "model", "created": 1, "owned_by": "deltaserve"},
        {"id": "support-bot", "object": "model", "created": 2, "owned_by": "deltaserve", "parent": "smollm2"},
    ],
}
DELTA = {"name": "support-bot", "method": "darex-q", "density": 0.1, "q": 0.7, "size_bytes": 1234, "extra": 1}


@pytest.fixture
def delta_file(tmp_path: Path) -> Path:
    path = tmp_path / "support-bot.safetensors"
    path.write_bytes(bytes(range(256)) * 1000)  # 256 kB: several multipart read chunks
    return path


def test_inference_calls_use_the_api_key(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(200, json=MODELS))
    with make_client(server, api_key="inf-key", admin_key="adm-key") as client:
        models = client.models()
    assert server.requests[0].headers["authorization"] == "Bearer inf-key"
    assert [(m.id, m.parent) for m in models.data] == [("smollm2", None), ("support-bot", "smollm2")]


def test_admin_calls_use_the_admin_key(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(204))
    with make_client(server, api_key="inf-key", admin_key="adm-key") as client:
        client.delete_delta("support-bot")
    request = server.requests[0]
    assert (request.method, request.url.path) == ("DELETE", "/v1/deltas/support-bot")
    assert request.headers["authorization"] == "Bearer adm-key"


def test_keys_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., Client]
) -> None:
    monkeypatch.setenv("DELTASERVE_API_KEY", "env-inf")
    monkeypatch.setenv("DELTASERVE_ADMIN_KEY", "env-adm")
    server = Recorder(reply(200, json=DELTA))
    with make_client(server) as client:
        client.get_delta("support-bot")
        client.delete_delta("support-bot")
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer env-inf", "Bearer env-adm"]


def test_no_key_sends_no_authorization_header(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(200, json=MODELS))
    with make_client(server) as client:
        client.models()
    assert "authorization" not in server.requests[0].headers


def test_upload_streams_the_file_as_multipart(make_client: Callable[..., Client], delta_file: Path) -> None:
    server = Recorder(reply(201, json=DELTA))
    progress: list[tuple[int, int]] = []
    with make_client(server, api_key="inf-key", admin_key="adm-key") as client:
        info = client.upload_delta(
            delta_file, "support-bot", progress=lambda done, total: progress.append((done, total))
        )
    request = server.requests[0]
    assert (request.method, request.url.path) == ("POST", "/v1/deltas")
    assert request.headers["authorization"] == "Bearer adm-key"
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert int(request.headers["content-length"]) == len(server.bodies[0])  # sized, not chunked
    fields = multipart_fields(request, server.bodies[0])
    assert fields == {"name": (None, b"support-bot"), "file": (delta_file.name, delta_file.read_bytes())}
    size = delta_file.stat().st_size
    assert len(progress) > 2 and progress[-1] == (size, size)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert (info.name, info.method, info.density, info.q) == ("support-bot", "darex-q", 0.1, 0.7)
    assert info.model_extra == {"extra": 1}


@pytest.mark.asyncio
async def test_async_upload_streams_the_file_as_multipart(
    make_async_client: Callable[..., AsyncClient], delta_file: Path
) -> None:
    server = Recorder(reply(201, json=DELTA))
    async with make_async_client(server, admin_key="adm-key") as client:
        info = await client.upload_delta(delta_file, "support-bot")
    assert info.name == "support-bot"
    assert server.requests[0].headers["authorization"] == "Bearer adm-key"
    fields = multipart_fields(server.requests[0], server.bodies[0])
    assert fields["file"] == (delta_file.name, delta_file.read_bytes())


def test_upload_of_a_missing_file_never_reaches_the_network(
    make_client: Callable[..., Client], tmp_path: Path
) -> None:
    server = Recorder(reply(201, json=DELTA))
    with make_client(server) as client, pytest.raises(FileNotFoundError):
        client.upload_delta(tmp_path / "nope.safetensors", "x")
    assert server.requests == []


def test_completion_body_carries_only_what_was_set(make_client: Callable[..., Client]) -> None:
    answer = {"id": "c", "object": "text_completion", "model": "d", "choices": [{"index": 0, "text": " world"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    server = Recorder(reply(200, json=answer))
    with make_client(server) as client:
        result = client.completions("d", "hello", temperature=0.0, seed=3, stop=["\n"], top_p=None)
    assert json.loads(server.requests[0].content) == {
        "model": "d", "prompt": "hello", "stream": False, "temperature": 0.0, "seed": 3, "stop": ["\n"]
    }  # fmt: skip
    assert result.text == " world"
    assert result.usage is not None and result.usage.total_tokens == 2


@pytest.mark.asyncio
async def test_async_chat_accepts_models_and_dicts(make_async_client: Callable[..., AsyncClient]) -> None:
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}]
    }
    server = Recorder(reply(200, json=answer))
    messages: list[ChatMessage | dict[str, str]] = [
        ChatMessage(role="system", content="Be brief."),
        {"role": "user", "content": "Hello"},
    ]
    async with make_async_client(server) as client:
        result = await client.chat("d", messages, max_tokens=5)
    body = json.loads(server.requests[0].content)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    assert (body["max_tokens"], body["stream"]) == (5, False)
    assert result.text == "Hi!"


def test_list_deltas_accepts_an_openai_list_or_a_bare_array(make_client: Callable[..., Client]) -> None:
    server = Recorder(
        reply(200, json={"object": "list", "data": [DELTA]}), reply(200, json=[{"id": "other"}])
    )
    with make_client(server) as client:
        assert [d.name for d in client.list_deltas().data] == ["support-bot"]
        assert [d.name for d in client.list_deltas().data] == ["other"]


def test_delta_names_cannot_escape_their_path_segment(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(404, json=error_body("no such delta")))
    with make_client(server) as client, pytest.raises(errors.NotFoundError):
        client.get_delta("../admin?x=1")
    assert server.requests[0].url.raw_path == b"/v1/deltas/..%2Fadmin%3Fx%3D1"


def test_probes(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(200, json={"status": "ok"}), reply(200), reply(503))
    with make_client(server, max_retries=0) as client:
        assert client.health() is True
        assert client.ready() is True
        assert client.ready() is False
    assert [r.url.path for r in server.requests] == ["/health", "/ready", "/ready"]


def test_server_url_keeps_a_path_prefix(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(200, json=MODELS))
    with make_client(server, server="http://gateway.test/deltaserve/") as client:
        client.models()
    assert str(server.requests[0].url) == "http://gateway.test/deltaserve/v1/models"


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host", "http://"])
def test_bad_server_urls_are_rejected_up_front(url: str) -> None:
    with pytest.raises(ValueError, match="server URL"):
        Client(url)


def test_settings_read_the_environment_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTASERVE_SERVER", "http://gpu-box:9000/")
    monkeypatch.setenv("DELTASERVE_TIMEOUT", "5")
    settings = ClientSettings()
    assert (settings.server, settings.timeout, settings.max_retries) == ("http://gpu-box:9000", 5.0, 2)
    with Client() as client:
        assert client.config.base_url == "http://gpu-box:9000"
    with Client("http://explicit:1", timeout=1.0) as client:  # arguments win over the environment
        assert (client.config.base_url, client.config.timeout) == ("http://explicit:1", 1.0)
