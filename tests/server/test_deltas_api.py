"""The delta admin API end to end: upload, validation before visibility, versions, delete."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from deltas_store import DeltaStore
from tests.server.conftest import BASE_ID, MAX_TOKENS, PROMPTS, LiveServer
from tests.server.test_errors import assert_error


def upload(server: LiveServer, path: Path, name: str) -> httpx.Response:
    with server.admin() as c, path.open("rb") as fh:
        return c.post(
            "/v1/deltas", files={"file": (path.name, fh, "application/octet-stream")}, data={"name": name}
        )


def greedy(server: LiveServer, model: str, prompt: str = PROMPTS[0]) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    with server.client() as c:
        return c.post("/v1/completions", json=body)


def store_state(server: LiveServer) -> list[tuple[str, int, str]]:
    return [(d.name, d.version, d.sha256) for d in DeltaStore(server.settings.store).list()]


def test_upload_serves_the_delta_exactly_and_reports_its_summary(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], references: dict[str, list[str]]
) -> None:
    server = make_server()
    assert_error(greedy(server, "math"), 404)
    r = upload(server, delta_files["ft-2"], "math")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "math" and info["parent"] == BASE_ID and info["version"] == 1
    assert info["method"] == "dare" and abs(info["density"] - 0.5) < 0.05 and info["size_bytes"] > 0
    assert info["residency"] in ("cached", "patched")
    assert greedy(server, "math").json()["choices"][0]["text"] == references["ft-2"][0]
    with server.client() as c:
        listed = c.get("/v1/deltas").json()["data"]
        assert [d["name"] for d in listed] == ["math"]
        assert c.get("/v1/deltas/math").json()["residency"] == "patched"
        assert "math" in {m["id"] for m in c.get("/v1/models").json()["data"]}


def test_reupload_makes_a_new_version_and_serves_it(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], references: dict[str, list[str]]
) -> None:
    server = make_server()
    assert upload(server, delta_files["ft-0"], "v").status_code == 201
    assert greedy(server, "v").json()["choices"][0]["text"] == references["ft-0"][0]
    r = upload(server, delta_files["ft-1"], "v")
    assert r.status_code == 201 and r.json()["version"] == 2
    assert greedy(server, "v").json()["choices"][0]["text"] == references["ft-1"][0]


def test_corrupt_upload_is_rejected_and_the_store_is_unchanged(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path
) -> None:
    server = make_server()
    assert upload(server, delta_files["ft-0"], "good").status_code == 201
    before = store_state(server)
    data = bytearray(delta_files["ft-1"].read_bytes())
    for offset in (len(data) // 2, len(data) - 10):  # flip bytes in the tensor data
        data[offset] ^= 0xFF
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    assert_error(upload(server, corrupt, "bad"), 400, "invalid_delta")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 3]))
    assert_error(upload(server, truncated, "bad"), 400)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    assert_error(upload(server, garbage, "good"), 400)
    assert store_state(server) == before
    assert_error(greedy(server, "bad"), 404)
    assert not any((Path(server.settings.store) / "tmp").iterdir()), "staging files must not be left behind"


def test_wrong_base_upload_is_409_and_the_store_is_unchanged(
    make_server: Callable[..., LiveServer], wrong_base_delta: Path
) -> None:
    server = make_server()
    assert_error(upload(server, wrong_base_delta, "wrong"), 409, "base_mismatch")
    assert store_state(server) == []
    assert_error(greedy(server, "wrong"), 404)


def test_invalid_names_and_missing_parts_are_400(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path]
) -> None:
    server = make_server()
    assert_error(upload(server, delta_files["ft-0"], "../escape"), 400, "invalid_name")
    assert_error(upload(server, delta_files["ft-0"], BASE_ID), 409)
    with server.admin() as c:
        assert_error(c.post("/v1/deltas", data={"name": "x"}), 400)
        assert_error(c.post("/v1/deltas", files={"file": ("d", b"abc")}), 400)
        assert_error(c.post("/v1/deltas", json={"name": "x"}), 400)
    assert store_state(server) == []


def test_oversized_upload_is_413_declared_or_streamed(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path]
) -> None:
    server = make_server(max_upload_bytes=1024)
    assert_error(upload(server, delta_files["ft-0"], "big"), 413)  # Content-Length says so up front
    payload = delta_files["ft-0"].read_bytes()
    boundary = "xyzzy"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit trips while streaming
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'.encode()
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d"\r\n\r\n'.encode()
        for i in range(0, len(payload), 512):
            yield payload[i : i + 512]
        yield f"\r\n--{boundary}--\r\n".encode()

    with server.admin() as c:
        r = c.post(
            "/v1/deltas",
            content=chunked(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    assert_error(r, 413)
    assert store_state(server) == []


def test_delete_lets_in_flight_requests_finish_then_404s(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], references: dict[str, list[str]]
) -> None:
    server = make_server()
    assert upload(server, delta_files["ft-1"], "gone").status_code == 201
    gate = threading.Event()
    blocked = server.runtime.scheduler.call(gate.wait)  # queue a request, then delete while it waits
    results: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: results.append(greedy(server, "gone")))
    worker.start()
    while server.runtime.scheduler.queued() < 1:
        time.sleep(0.01)
    deleted: list[httpx.Response] = []
    deleter = threading.Thread(target=lambda: deleted.append(server.admin().delete("/v1/deltas/gone")))
    deleter.start()
    deadline = time.monotonic() + 30
    while "gone" in server.runtime.registry.names():  # until the delete has started (it waits for the queue)
        assert time.monotonic() < deadline, "the delete never started"
        time.sleep(0.01)
    assert_error(greedy(server, "gone"), 404)  # refused while the delete waits for the queued one
    gate.set()
    blocked.result(10)
    worker.join(10)
    deleter.join(10)
    assert results[0].status_code == 200 and results[0].json()["choices"][0]["text"] == references["ft-1"][0]
    assert deleted[0].status_code == 200 and deleted[0].json()["deleted"] is True
    assert_error(greedy(server, "gone"), 404)
    assert store_state(server) == []
    assert server.runtime.swaps.active is None
    with server.admin() as c:
        assert_error(c.delete("/v1/deltas/gone"), 404)
