"""`deltaserve serve` as a real process: fails fast on bad paths, serves, and drains on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import seeded_store

DELTASERVE = [sys.executable, "-c", "from client.cli import main; raise SystemExit(main())"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[str], url: str, timeout_s: float) -> None:
    """Poll /ready until 200; fail with the server's stderr if the process dies first."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready within {timeout_s} s"
        time.sleep(0.1)


def test_serve_fails_fast_with_a_clear_message_on_a_bad_base(tmp_path: Path) -> None:
    r = subprocess.run(
        [*DELTASERVE, "serve", "--base", str(tmp_path / "missing"), "--store", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "DELTASERVE_BASE": ""},
    )  # fmt: skip
    assert r.returncode == 2 and "missing" in r.stderr


@pytest.mark.slow
def test_serve_without_base_serves_the_embedded_smollm2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTASERVE_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")  # the default store lands here
    if "DELTASERVE_CACHE_DIR" in os.environ:  # reuse a converted model if the caller keeps one elsewhere
        env["DELTASERVE_CACHE_DIR"] = os.environ["DELTASERVE_CACHE_DIR"]
    port = _free_port()
    proc = subprocess.Popen(
        [*DELTASERVE, "serve", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, timeout_s=600)
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct"]
        assert (tmp_path / "data" / "deltaserve" / "store").is_dir()
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 4}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(60)


def test_sigterm_drains_in_flight_streams(
    tiny_llama_dir: Path, delta_files: dict[str, Path], tmp_path: Path
) -> None:
    store = seeded_store(tmp_path / "store", delta_files)
    port = _free_port()
    env = {**os.environ, "DELTASERVE_API_KEY": "", "DELTASERVE_ADMIN_KEY": ""}
    env = {k: v for k, v in env.items() if v}
    proc = subprocess.Popen(
        [*DELTASERVE, "serve", "--base", str(tiny_llama_dir), "--store", str(store), "--port", str(port),
         "--device", "cpu", "--model-id", "base", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, timeout_s=90)
        models = ("base", "ft-0", "ft-1", "ft-2")
        # SIGTERM only once every stream is in flight: a client that has not connected yet
        # would (rightly) be refused by a draining server.
        streaming = {m: threading.Event() for m in models}
        outcomes: list[tuple[str, int]] = []

        def stream(model: str) -> None:
            body = {
                "model": model,
                "prompt": "Hello",
                "max_tokens": 200,
                "temperature": 0.8,
                "seed": 3,
                "stream": True,
            }
            events = []
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        streaming[model].set()
            outcomes.append((events[-1], len(events)))

        threads = [threading.Thread(target=stream, args=(m,)) for m in models]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in streaming.values())
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert len(outcomes) == 4
        for last, count in outcomes:
            assert last == "[DONE]" and count >= 2
    finally:
        if proc.poll() is None:
            proc.kill()
