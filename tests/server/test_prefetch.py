"""Deltas only on disk are read off the worker thread: other models keep being served meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import server.routing.loading as loading
from deltas_store import DeltaFormatError
from tests.server.conftest import BASE_ID, MAX_TOKENS, PROMPTS, LiveServer, seeded_store


def complete(server: LiveServer, model: str, prompt: str, done: list[str]) -> httpx.Response:
    with server.client() as c:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        response = c.post("/v1/completions", json=body)
    done.append(model)
    return response


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("batch_mode", ["merged", "mixed"])
def test_a_delta_read_from_disk_does_not_hold_up_other_models(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    references: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch, batch_mode: str,
) -> None:  # fmt: skip
    server = make_server(seeded_store(tmp_path / "store", delta_files), batch_mode=batch_mode)
    release, reading = threading.Event(), threading.Event()
    real = loading.read_delta

    def slow(path: Path) -> object:
        reading.set()
        assert release.wait(60)
        return real(path)

    monkeypatch.setattr(loading, "read_delta", slow)
    done: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        cold = pool.submit(complete, server, "ft-0", PROMPTS[0], done)
        assert reading.wait(30)  # its read started as soon as it was queued
        base = pool.submit(complete, server, BASE_ID, PROMPTS[1], done)
        response = base.result(60)  # served while ft-0 is still being read
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] == references[BASE_ID][1]
        assert not cold.done()
        release.set()
        response = cold.result(60)
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == references["ft-0"][0]
    assert done == [BASE_ID, "ft-0"]


def test_a_failed_background_read_fails_its_requests_only_and_a_retry_reads_again(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    references: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    server = make_server(seeded_store(tmp_path / "store", delta_files))
    real = loading.read_delta
    calls: list[Path] = []

    def broken(path: Path) -> object:
        calls.append(path)
        raise DeltaFormatError(f"{path}: checksum mismatch")

    monkeypatch.setattr(loading, "read_delta", broken)
    done: list[str] = []
    failed = complete(server, "ft-1", PROMPTS[0], done)
    assert failed.status_code >= 400
    assert "checksum mismatch" in failed.text
    assert calls  # it was read (and failed) rather than served from anywhere else
    ok = complete(server, BASE_ID, PROMPTS[2], done)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == references[BASE_ID][2]
    monkeypatch.setattr(loading, "read_delta", real)  # the file is fine again: nothing stale is kept
    retry = complete(server, "ft-1", PROMPTS[0], done)
    assert retry.status_code == 200 and retry.json()["choices"][0]["text"] == references["ft-1"][0]
    wait_for(lambda: not server.runtime.scheduler.loader._inflight)
