"""`--method auto`: magnitude for large deltas, DAREx-q for small ones at high p; it records why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltas_store.compression.autoselect import LARGE_RELATIVE_DELTA, DeltaStats, decide
from deltas_store.compression.pipeline import CompressOptions, compress
from deltas_store.format.io import read_manifest
from tests.models import perturb

FAST = {"calibration_samples": 2, "calibration_tokens": 16}


def _stats(relative: float) -> DeltaStats:
    s = DeltaStats()
    s.add_(torch.full((100,), relative), torch.ones(100))
    return s


def test_large_delta_pair_gets_magnitude(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ft = perturb(tiny_llama_dir, tmp_path / "far", scale=1.0, seed=5)  # a distant "fine-tune"
    r = compress(
        CompressOptions(tiny_llama_dir, ft, tmp_path / "a.safetensors", method="auto", drop_rate=0.9, **FAST)
    )
    auto = read_manifest(r.path).auto
    assert r.manifest.method == "magnitude" and auto is not None and auto.method == "magnitude"
    assert auto.measured["relative_delta"] >= LARGE_RELATIVE_DELTA
    assert {"mean_abs_delta", "std_delta", "base_output_change", "dare_output_change"} <= set(auto.measured)
    assert "large deltas" in auto.reason and "magnitude" in auto.reason


def test_small_delta_pair_gets_darex_q(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ft = perturb(tiny_llama_dir, tmp_path / "near", scale=0.01, seed=6)
    r = compress(
        CompressOptions(tiny_llama_dir, ft, tmp_path / "s.safetensors", method="auto", drop_rate=0.99, **FAST)
    )
    m = r.manifest
    assert m.method == "darex-q" and m.auto is not None and m.auto.q_mode == "global"  # decoder: global q
    assert m.auto.measured["relative_delta"] < LARGE_RELATIVE_DELTA
    assert m.calibration is not None and m.q is not None and 0.01 <= m.q <= 1.0
    assert "DAREx-q" in m.auto.reason and "label-free" in m.auto.reason


@pytest.mark.parametrize(
    ("relative", "p", "kw", "method", "q_mode"),
    [
        (0.5, 0.9, {"has_calibration": True}, "wanda", "none"),
        (0.5, 0.9, {}, "magnitude", "none"),
        (0.01, 0.99, {}, "darex-q", "best"),  # encoder: global and per-layer compared
        (0.01, 0.5, {"base_output_change": 1.0, "dare_output_change": 0.1}, "dare", "none"),
        (0.01, 0.5, {"base_output_change": 1.0, "dare_output_change": 0.9}, "darex-q", "best"),
    ],
)
def test_decision_branches(
    relative: float, p: float, kw: dict[str, object], method: str, q_mode: str
) -> None:
    args: dict[str, object] = {"decoder": False, "has_calibration": False, "labeled": False, **kw}
    d = decide(_stats(relative), p, **args)  # type: ignore[arg-type]
    assert (d.method, d.q_mode) == (method, q_mode)
    assert d.measured["relative_delta"] == pytest.approx(relative) and d.reason
