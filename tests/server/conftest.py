"""Live deltaserve servers on loopback (uvicorn in a thread), deltas of the tiny Llama, reference outputs."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from deltas_store import CompressOptions, DeltaStore, apply_to_dir, compress
from server.app import create_app
from server.runtime import Runtime
from server.settings import ServerSettings

API_KEY = "sk-test-inference"
ADMIN_KEY = "sk-test-admin"
BASE_ID = "tiny-base"
PROMPTS = ["Hello world", "The quick brown fox", "A sparse delta", "Fine-tuned variants of one"]
MAX_TOKENS = 8


@dataclass
class LiveServer:
    """A real uvicorn server on 127.0.0.1 running `app` in a background thread."""

    url: str
    app: FastAPI
    settings: ServerSettings
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    def client(self, key: str | None = API_KEY, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kwargs.setdefault("timeout", 60.0)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def admin(self) -> httpx.Client:
        return self.client(ADMIN_KEY)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(settings: ServerSettings, wait_ready: bool = True) -> LiveServer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", app, settings, server, thread)
    deadline = time.monotonic() + 60
    while wait_ready:
        try:
            if httpx.get(f"{live.url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or app.state.load_error:
            live.stop()
            raise RuntimeError(f"server did not become ready: {app.state.load_error}")
        time.sleep(0.05)
    return live


@pytest.fixture(scope="session")
def delta_files(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """One DARE delta (half the changes kept) per fine-tune, named like it."""
    out = tmp_path_factory.mktemp("deltas")
    return {
        name: compress(
            CompressOptions(
                tiny_llama_dir, ft, out / f"{name}.safetensors", method="dare", drop_rate=0.5, seed=i
            )
        ).path
        for i, (name, ft) in enumerate(sorted(tiny_llama_finetunes.items()))
    }


@pytest.fixture(scope="session")
def wrong_base_delta(
    other_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A delta made against another base of the very same shapes."""
    out = tmp_path_factory.mktemp("wrong") / "wrong.safetensors"
    return compress(CompressOptions(other_llama_dir, tiny_llama_finetunes["ft-0"], out, method="dare")).path


def greedy_reference(model_dir: Path, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    """transformers' own greedy `generate` on a model directory, as text (what the server must return)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


@pytest.fixture(scope="session")
def references(
    tiny_llama_dir: Path, delta_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[str]]:
    """model name -> greedy texts for PROMPTS, from the HF dirs `deltaserve apply` writes."""
    root = tmp_path_factory.mktemp("applied")
    refs = {BASE_ID: greedy_reference(tiny_llama_dir, PROMPTS)}
    for name, path in delta_files.items():
        refs[name] = greedy_reference(apply_to_dir(tiny_llama_dir, path, root / name), PROMPTS)
    assert len({tuple(v) for v in refs.values()}) == len(refs), "deltas should change the greedy outputs"
    return refs


def make_settings(base: Path, store: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "base": base,
        "store": store,
        "device": "cpu",
        "dtype": "float32",
        "model_id": BASE_ID,
        "api_key": API_KEY,
        "admin_key": ADMIN_KEY,
        "max_wait_ms": 20.0,
    }
    values.update(overrides)
    return ServerSettings(**values)


def seeded_store(root: Path, delta_files: dict[str, Path]) -> Path:
    store = DeltaStore(root)
    for name, path in delta_files.items():
        store.put(name, path)
    return root


@pytest.fixture(scope="module")
def live(
    tiny_llama_dir: Path, delta_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with API and admin keys whose store holds ft-0, ft-1, ft-2."""
    store = seeded_store(tmp_path_factory.mktemp("store"), delta_files)
    server = start_server(make_settings(tiny_llama_dir, store))
    yield server
    server.stop()


@pytest.fixture
def make_server(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start a server with its own (empty or given) store and setting overrides; stopped after the test."""
    started: list[LiveServer] = []

    def make(store: Path | None = None, **overrides: Any) -> LiveServer:
        root = store or tmp_path / f"store-{len(started)}"
        server = start_server(make_settings(tiny_llama_dir, root, **overrides))
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def copy_file(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    return dest
