"""The shared request/response layer: request specs, building, error translation, parsing, retry policy."""

from __future__ import annotations

import email.utils
import io
import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from client.errors import APIConnectionError, APIError, APIResponseValidationError, error_class_for
from client.settings import ClientSettings, normalize_base_url

ModelT = TypeVar("ModelT", bound=BaseModel)

ProgressCallback = Callable[[int, int], None]
"""Called as `progress(bytes_sent, total_bytes)` while an upload's body is read from disk."""

RETRY_STATUSES = frozenset({429, 503})
# Raised before any byte of the request left this process: even a non-idempotent upload may be resent.
_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_USER_AGENT = "deltaserve-python"


# --- what to send --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """A file streamed from disk as multipart field `file`, next to form field `name`."""

    path: Path
    name: str
    progress: ProgressCallback | None = None


@dataclass(frozen=True)
class RequestSpec:
    """One API call, independent of the transport that sends it."""

    method: str
    path: str
    json: Mapping[str, Any] | None = None
    upload: Upload | None = None
    admin: bool = False  # authenticate with the admin key instead of the inference key
    stream: bool = False  # the answer is an SSE stream
    # False for calls with side effects (uploads): after the body may have left, resend only on 429/503.
    replayable: bool = True
    retry_statuses: frozenset[int] = field(default=RETRY_STATUSES)


# --- how to send it ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again: 429/503 and connection errors, waiting Retry-After or exponential backoff.

    Example:
        >>> RetryPolicy(max_retries=3, backoff=0.5).backoff_delay(2)
        2.0
    """

    max_retries: int = 2
    backoff: float = 0.5  # first wait; doubles on each further attempt
    max_delay: float = 30.0  # cap on any single wait, the server's Retry-After included

    def backoff_delay(self, attempt: int) -> float:
        """The wait before retry number `attempt + 1` when the server did not say how long."""
        return min(self.backoff * 2.0**attempt, self.max_delay)

    def after_response(self, response: httpx.Response, attempt: int, spec: RequestSpec) -> float | None:
        """Seconds to wait before resending after `response`, or None to keep this answer."""
        if attempt >= self.max_retries or response.status_code not in spec.retry_statuses:
            return None
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return self.backoff_delay(attempt) if retry_after is None else min(retry_after, self.max_delay)

    def after_error(self, error: httpx.TransportError, attempt: int, spec: RequestSpec) -> float | None:
        """Seconds to wait before resending after a transport failure, or None to give up."""
        if attempt >= self.max_retries:
            return None
        if not spec.replayable and not isinstance(error, _NOT_SENT_ERRORS):
            return None
        return self.backoff_delay(attempt)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


@dataclass(frozen=True)
class ClientConfig:
    """Everything both transports need to talk to one server, resolved once."""

    base_url: str
    api_key: str | None
    admin_key: str | None
    timeout: float
    retry: RetryPolicy

    @classmethod
    def resolve(
        cls,
        server: str | None,
        *,
        api_key: str | None,
        admin_key: str | None,
        timeout: float | None,
        max_retries: int | None,
        settings: ClientSettings | None,
    ) -> ClientConfig:
        """Explicit arguments first, then `settings` (read from `DELTASERVE_*` when not given)."""
        settings = settings if settings is not None else ClientSettings()
        env_api = settings.api_key.get_secret_value() if settings.api_key else None
        env_admin = settings.admin_key.get_secret_value() if settings.admin_key else None
        retries = settings.max_retries if max_retries is None else max_retries
        if retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {retries}")
        return cls(
            base_url=normalize_base_url(server if server is not None else settings.server),
            api_key=api_key if api_key is not None else env_api,
            admin_key=admin_key if admin_key is not None else env_admin,
            timeout=timeout if timeout is not None else settings.timeout,
            retry=RetryPolicy(max_retries=retries, max_delay=settings.max_retry_delay),
        )

    def headers(self, spec: RequestSpec) -> dict[str, str]:
        """Per-request headers: the right key for the route, and what we accept back."""
        headers = {"Accept": "text/event-stream" if spec.stream else "application/json"}
        key = self.admin_key if spec.admin else self.api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def http_options(self) -> dict[str, Any]:
        """Keyword arguments for `httpx.Client` / `httpx.AsyncClient`."""
        return {
            "base_url": self.base_url,
            "timeout": httpx.Timeout(self.timeout),
            "headers": {"User-Agent": _USER_AGENT},
        }


class _ProgressFile(io.BufferedReader):
    """A file on disk that reports how far the multipart encoder has read it."""

    def __init__(self, path: Path, progress: ProgressCallback) -> None:
        total = path.stat().st_size
        super().__init__(io.FileIO(path, "rb"))
        self._progress = progress
        self._total = total

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        self._progress(self.tell(), self._total)
        return chunk


@contextmanager
def open_request(
    http: httpx.Client | httpx.AsyncClient, config: ClientConfig, spec: RequestSpec
) -> Iterator[httpx.Request]:
    """Build one attempt's request; an upload's file is (re)opened here and closed after the send."""
    with ExitStack() as stack:
        files: dict[str, tuple[str, io.BufferedReader, str]] | None = None
        data: dict[str, str] | None = None
        if spec.upload is not None:
            upload = spec.upload
            handle = (
                _ProgressFile(upload.path, upload.progress) if upload.progress else upload.path.open("rb")
            )
            stack.enter_context(handle)
            files = {"file": (upload.path.name, handle, "application/octet-stream")}
            data = {"name": upload.name}
        yield http.build_request(
            spec.method, spec.path, json=spec.json, files=files, data=data, headers=config.headers(spec)
        )


# --- what came back ------------------------------------------------------------------------------


def connection_error(error: httpx.TransportError, config: ClientConfig) -> APIConnectionError:
    """A transport failure as the client's typed error, naming the server."""
    return APIConnectionError(f"could not talk to {config.base_url}: {str(error) or type(error).__name__}")


def error_from_response(response: httpx.Response) -> APIError:
    """Translate an error response (body already read) into its typed `APIError` subclass."""
    message, kind, param, code = _error_fields(response)
    return error_class_for(response.status_code)(
        response.status_code,
        message,
        type=kind,
        param=param,
        code=code,
        request_id=response.headers.get("x-request-id"),
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _error_fields(response: httpx.Response) -> tuple[str, str | None, str | None, str | None]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            kind, param, code = (str_or_none(error.get(key)) for key in ("type", "param", "code"))
            return str(error["message"]), kind, param, code
        detail = body.get("detail")  # FastAPI's own shape, should a route escape the error handler
        if isinstance(detail, str):
            return detail, None, None, None
        if isinstance(detail, list):
            parts = [
                f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}"
                for d in detail
                if isinstance(d, dict)
            ]
            return "; ".join(parts) or str(detail), None, None, None
    # Not our JSON (a proxy's HTML page, a crash): one readable line of it, never a wall of text.
    text = " ".join(response.text.split())
    return (text[:300] or response.reason_phrase or "error"), None, None, None


def parse_response(response: httpx.Response, model: type[ModelT]) -> ModelT:
    """Raise the typed error for an error status, else validate the JSON body as `model`."""
    if response.is_error:
        raise error_from_response(response)
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise APIResponseValidationError(
            f"{response.request.method} {response.request.url.path}: unexpected response body: {exc}"
        ) from exc


def check_response(response: httpx.Response) -> None:
    """Raise the typed error for an error status; the body of a success does not matter."""
    if response.is_error:
        raise error_from_response(response)


def probe_result(response: httpx.Response) -> bool:
    """`/health` and `/ready`: True on 2xx, False on 503 (alive but not ready), typed error otherwise."""
    if response.status_code == 503:
        return False
    check_response(response)
    return True
