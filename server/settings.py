"""Typed server settings, read from arguments or `DELTASERVE_*` environment variables; built on use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


def default_store_dir() -> Path:
    """$XDG_DATA_HOME/deltaserve/store, else ~/.local/share/deltaserve/store."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "deltaserve" / "store"


class ServerSettings(BaseSettings):
    """Everything `deltaserve serve` can be told; every field also reads `DELTASERVE_<FIELD>`.

    Example:
        >>> ServerSettings(base=Path("models/base"), store=Path("deltas")).port
        8000
    """

    model_config = SettingsConfigDict(env_prefix="DELTASERVE_", extra="ignore")

    base: Path | None = Field(
        default=None, description="Hugging Face model directory of the base (default: the embedded SmolLM2)"
    )
    store: Path = Field(default_factory=lambda: default_store_dir(), description="delta store directory")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: Device = "auto"  # auto = cuda when available, else cpu
    dtype: DType = "auto"  # auto = the checkpoint's dtype
    model_id: str | None = Field(default=None, description="id the base is served under (default: its name)")
    api_key: SecretStr | None = None  # required on inference routes when set
    admin_key: SecretStr | None = None  # admin routes are refused (403) when unset

    max_upload_bytes: int = Field(default=8 << 30, gt=0)
    max_batch_size: int = Field(default=8, ge=1)
    max_queue: int = Field(default=256, ge=1, description="queued requests (all models) before 429")
    max_wait_ms: float = Field(default=200.0, ge=0, description="longest a model waits behind another")
    cache_bytes: int = Field(default=2 << 30, ge=0, description="LRU budget for prepared deltas")
    batch_mode: Literal["auto", "merged", "mixed"] = Field(
        default="auto", description="merged: one model per batch; mixed: deltas as side terms; auto: per step"
    )
    mixed_max_density: float = Field(
        default=0.05, ge=0, le=1, description="auto: deltas denser than this are never mixed"
    )
    continuous_batching: bool = Field(
        default=True, description="queued requests join a running batch between decode steps"
    )
    swap_mode: Literal["delta", "full"] = Field(
        default="delta",
        description="full = the naive baseline: copy a whole fine-tuned weight set per switch",
    )
    default_max_tokens: int = Field(default=256, ge=1)
    max_stop_sequences: int = Field(default=4, ge=0)
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After sent with 429/503")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="graceful shutdown: in-flight requests")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
