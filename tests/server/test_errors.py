"""Bad input end to end: the right 4xx in OpenAI's error shape, never a 500 for a user mistake."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.server.conftest import ADMIN_KEY, API_KEY, BASE_ID, LiveServer


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


def test_unknown_model_is_404_and_lists_served_models(live: LiveServer) -> None:
    with live.client() as c:
        error = assert_error(
            c.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404, "model_not_found"
        )
        assert "ft-0" in str(error["message"]) and error["param"] == "model"
        assert_error(
            c.post(
                "/v1/chat/completions",
                json={"model": "../etc", "messages": [{"role": "user", "content": "x"}]},
            ),
            404,
        )
        assert_error(c.get("/v1/deltas/nope"), 404)
        assert_error(c.get("/v1/nothing-here"), 404)


def test_malformed_json_is_400_and_bad_fields_are_422(live: LiveServer) -> None:
    with live.client() as c:
        r = c.post(
            "/v1/completions",
            content=b'{"model": "x", "prompt": ',
            headers={"content-type": "application/json"},
        )
        assert_error(r, 400, "invalid_json")
        error = assert_error(
            c.post("/v1/completions", json={"model": BASE_ID, "prompt": "hi", "temperature": "hot"}), 422
        )
        assert error["param"] == "temperature"
        assert_error(c.post("/v1/completions", json={"model": BASE_ID}), 422)
        assert_error(c.post("/v1/completions", json={"model": BASE_ID, "prompt": "hi", "max_tokens": 0}), 422)
        assert_error(c.post("/v1/completions", json={"model": BASE_ID, "prompt": 5}), 422)
        assert_error(c.post("/v1/chat/completions", json={"model": BASE_ID, "messages": []}), 422)
        assert_error(
            c.post(
                "/v1/chat/completions",
                json={"model": BASE_ID, "messages": [{"role": "wizard", "content": "x"}]},
            ),
            422,
        )


def test_requests_the_model_cannot_serve_are_400(live: LiveServer) -> None:
    with live.client() as c:
        too_long = {"model": BASE_ID, "prompt": "hi", "max_tokens": 100_000}
        assert_error(c.post("/v1/completions", json=too_long), 400, "context_length_exceeded")
        assert_error(c.post("/v1/completions", json={"model": BASE_ID, "prompt": [999_999]}), 400)
        assert_error(c.post("/v1/completions", json={"model": BASE_ID, "prompt": "hi", "logprobs": 2}), 400)
        assert_error(
            c.post("/v1/completions", json={"model": BASE_ID, "prompt": "hi", "stop": list("abcdefg")}), 400
        )
        assert_error(c.post("/v1/completions", json={"model": BASE_ID, "prompt": ""}), 400)


def test_missing_or_wrong_key_is_401_and_inference_key_on_admin_route_is_403(live: LiveServer) -> None:
    body = {"model": BASE_ID, "prompt": "hi", "max_tokens": 1}
    with live.client(key=None) as c:
        assert_error(c.post("/v1/completions", json=body), 401)
        assert_error(c.get("/v1/models"), 401)
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    with live.client(key="wrong") as c:
        assert_error(c.post("/v1/completions", json=body), 401)
        assert_error(c.delete("/v1/deltas/ft-0"), 401)
    with live.client(key=API_KEY) as c:
        assert_error(c.delete("/v1/deltas/ft-0"), 403, "permission_denied")
        assert_error(c.post("/v1/deltas", files={"file": ("d", b"x")}, data={"name": "x"}), 403)
    with live.client(key=ADMIN_KEY) as c:  # the admin key may also call inference routes
        assert c.post("/v1/completions", json=body).status_code == 200


def test_admin_routes_are_refused_without_an_admin_key(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(admin_key=None, api_key=None)
    with server.client(key=None) as c:
        error = assert_error(c.delete("/v1/deltas/anything"), 403)
        assert "DELTASERVE_ADMIN_KEY" in str(error["message"])
        assert c.get("/v1/models").status_code == 200  # no API key configured: inference is open


def test_queue_full_is_429_with_retry_after(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(max_queue=1, max_batch_size=1)
    runtime = server.runtime
    gate = threading.Event()
    blocked = runtime.scheduler.call(gate.wait)  # hold the worker so requests stay queued
    body = {"model": BASE_ID, "prompt": "hi", "max_tokens": 2, "temperature": 0}
    try:
        with server.client() as c:
            first = threading.Thread(target=lambda: server.client().post("/v1/completions", json=body))
            first.start()
            deadline = time.monotonic() + 10
            while runtime.scheduler.queued() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = c.post("/v1/completions", json=body)
            assert_error(r, 429, "queue_full")
            assert int(r.headers["retry-after"]) >= 0
    finally:
        gate.set()
        blocked.result(10)
        first.join(10)


def test_ready_is_503_until_the_model_is_loaded(
    make_server: Callable[..., LiveServer], tmp_path: object
) -> None:
    from pathlib import Path

    from server.app import create_app
    from tests.server.conftest import make_settings

    app = create_app(make_settings(Path("/nonexistent/base"), Path(str(tmp_path)) / "s"))
    import fastapi.testclient as tc

    with tc.TestClient(app) as client:
        deadline = time.monotonic() + 10
        while app.state.load_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and "retry-after" in r.headers
        assert_error(
            client.post(
                "/v1/completions",
                json={"model": "x", "prompt": "y"},
                headers={"Authorization": f"Bearer {API_KEY}"},
            ),
            503,
        )


def _cancelled(live: LiveServer) -> float:
    value: float = live.runtime.metrics.requests.labels("ft-1", "cancelled")._value.get()
    return value


def _wait_cancelled(live: LiveServer, before: float) -> None:
    deadline = time.monotonic() + 10
    while _cancelled(live) == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.02)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_client_disconnect_cancels_a_streamed_request(live: LiveServer, route: str) -> None:
    body: dict[str, object] = {"model": "ft-1", "max_tokens": 100, "temperature": 0, "stream": True}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"})
    before = _cancelled(live)
    gate = threading.Event()
    blocked = live.runtime.scheduler.call(gate.wait)  # the request stays queued until we hang up
    try:
        with live.client() as c, c.stream("POST", route, json=body) as r:
            assert r.status_code == 200
        time.sleep(0.3)
    finally:
        gate.set()
        blocked.result(10)
    _wait_cancelled(live, before)


def test_client_disconnect_cancels_a_plain_request(live: LiveServer) -> None:
    before = _cancelled(live)
    gate = threading.Event()
    blocked = live.runtime.scheduler.call(gate.wait)
    body = {"model": "ft-1", "prompt": "hi", "max_tokens": 100, "temperature": 0}
    try:
        with live.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body)
        time.sleep(0.6)  # the server polls for the disconnect
    finally:
        gate.set()
        blocked.result(10)
    _wait_cancelled(live, before)
