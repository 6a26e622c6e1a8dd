"""Client settings read from `DELTASERVE_*` environment variables; built on use, never at import."""

from __future__ import annotations

import httpx
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def normalize_base_url(url: str) -> str:
    """The server URL without a trailing slash; raises ValueError unless it is http(s)://host[...]."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"server URL is not a URL: {url!r} ({exc})") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"server URL must look like http://host:port, got {url!r}")
    return url.rstrip("/")


class ClientSettings(BaseSettings):
    """Where the server is and how to talk to it.

    Example:
        >>> import os
        >>> os.environ["DELTASERVE_SERVER"] = "http://gpu-box:8000"
        >>> ClientSettings().server
        'http://gpu-box:8000'
    """

    model_config = SettingsConfigDict(env_prefix="DELTASERVE_", extra="ignore")

    server: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    timeout: float = Field(default=60.0, gt=0, description="seconds per request (connect, read, write)")
    max_retries: int = Field(default=2, ge=0, description="retries on 429/503 and connection errors")
    max_retry_delay: float = Field(default=30.0, ge=0, description="cap on any single wait, Retry-After too")

    @field_validator("server")
    @classmethod
    def _check_server(cls, value: str) -> str:
        return normalize_base_url(value)
