"""The REST routes as transport-independent request specs (what each SDK method sends)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from client._base import ProgressCallback, RequestSpec, Upload
from client.types import ChatMessage

if TYPE_CHECKING:
    from typing import Unpack

    from client.types import SamplingParams

MODELS = RequestSpec("GET", "/v1/models")
DELTAS = RequestSpec("GET", "/v1/deltas")
HEALTH = RequestSpec("GET", "/health")
# 503 from /ready is the answer ("not ready yet"), not a reason to retry.
READY = RequestSpec("GET", "/ready", retry_statuses=frozenset({429}))


def _sampling(params: SamplingParams) -> dict[str, Any]:
    # Only what the caller set: everything left out takes the server's default.
    return {key: value for key, value in params.items() if value is not None}


def completion(model: str, prompt: str, *, stream: bool, **sampling: Unpack[SamplingParams]) -> RequestSpec:
    """`POST /v1/completions`."""
    body = {"model": model, "prompt": prompt, "stream": stream, **_sampling(sampling)}
    return RequestSpec("POST", "/v1/completions", json=body, stream=stream)


def chat(
    model: str,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    *,
    stream: bool,
    **sampling: Unpack[SamplingParams],
) -> RequestSpec:
    """`POST /v1/chat/completions`."""
    wire = [m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else dict(m) for m in messages]
    body = {"model": model, "messages": wire, "stream": stream, **_sampling(sampling)}
    return RequestSpec("POST", "/v1/chat/completions", json=body, stream=stream)


def upload_delta(path: str | Path, name: str, progress: ProgressCallback | None) -> RequestSpec:
    """`POST /v1/deltas` (admin key): the file is checked here so a typo never reaches the network."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such delta file: {path}")
    upload = Upload(path, name, progress)
    # Not replayable: once the body may have left, only a 429/503 answer proves the server dropped it.
    return RequestSpec("POST", "/v1/deltas", upload=upload, admin=True, replayable=False)


def get_delta(name: str) -> RequestSpec:
    """`GET /v1/deltas/{name}`."""
    return RequestSpec("GET", _delta_path(name))


def delete_delta(name: str) -> RequestSpec:
    """`DELETE /v1/deltas/{name}` (admin key)."""
    return RequestSpec("DELETE", _delta_path(name), admin=True)


def _delta_path(name: str) -> str:
    # Escaped so that a name can never leave its path segment (the server validates names too).
    if not name:
        raise ValueError("a delta name must not be empty")
    return f"/v1/deltas/{quote(name, safe='')}"
