"""Typed settings of the offline commands; every field also reads from a DELTASERVE_* variable."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OutputSettings(BaseSettings):
    """What every offline command shares: DELTASERVE_QUIET silences progress bars like --quiet."""

    model_config = SettingsConfigDict(env_prefix="DELTASERVE_", extra="ignore")

    quiet: bool = False


class CompressSettings(OutputSettings):
    """Defaults for `deltaserve compress` (flags override them)."""

    method: str = "darex-q"
    drop_rate: float = Field(0.9, ge=0.0, lt=1.0)
    q: float | None = None
    seed: int = Field(0, ge=0)
    calibration: Path | None = None
    prune_scope: str = "all"
    calibration_samples: int = Field(8, ge=1)
    calibration_tokens: int = Field(128, ge=8)
    q_mode: str = "global"  # global | per-layer | per-layer-abs | best
    mask_seeds: int = Field(1, ge=1)  # masks the q search averages over (paper: 4)
    mask_block: int = Field(1, ge=1)  # random masks keep aligned runs of this many entries whole
    eta: float | None = Field(None, gt=0.0)  # per-layer q: a fixed η instead of the search
    validation: Path | None = None  # JSONL for a labeled q search
