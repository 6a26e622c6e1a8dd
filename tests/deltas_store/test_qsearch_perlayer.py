"""Per-layer analytic q (Algorithm 3): the vectorised scan equals the sequential one; q stays in [k, 0.998]."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deltas_store.compression.perlayer import RowSums, layer_q, per_tensor_q, phi, row_q
from deltas_store.compression.pipeline import CompressOptions, CompressResult, compress
from deltas_store.format.io import manifest_summary


def _sequential_scan(s1: torch.Tensor, s2: torch.Tensor, p: float, eta: float) -> torch.Tensor:
    """Algorithm 3 written as the loop ALGORITHMS.md describes, one q at a time."""
    k = 1 - p
    c = math.log(2 / 0.05)
    rows = s1.numel()
    best = torch.full((rows,), math.inf, dtype=torch.float64)
    best_q = torch.full((rows,), k, dtype=torch.float64)
    stopped = torch.zeros(rows, dtype=torch.bool)
    step = 0
    while True:
        q = k + 0.001 * step
        if q > 0.998 + 1e-9:
            break
        f = (eta * (1 - k / q) * s1 + eta**2 * phi(p) * s2 / (4 * q**2) + c).abs()
        improved = f < best
        stopped |= ~improved
        best_q = torch.where(improved, torch.full_like(best_q, q), best_q)
        best = torch.where(improved, f, best)
        if int(stopped.sum()) >= math.ceil(0.8 * rows):
            break
        step += 1
    return best_q


@pytest.mark.parametrize(("p", "eta"), [(0.99, 0.3), (0.9, 1.0), (0.5, 0.05), (0.99, 20.0)])
def test_row_q_matches_sequential_scan_and_stays_in_range(p: float, eta: float) -> None:
    gen = torch.Generator().manual_seed(1)
    sums = RowSums.zeros(50)
    sums.add_weight_(torch.randn(50, 30, generator=gen) * 0.05, torch.randn(30, generator=gen))
    sums.add_bias_(torch.randn(50, generator=gen) * 0.05)
    q = row_q(sums, p, eta)
    assert torch.allclose(q, _sequential_scan(sums.s1, sums.s2, p, eta), atol=1e-9)
    assert bool(((q >= 1 - p - 1e-12) & (q <= 0.998 + 1e-12)).all())
    assert 1 - p - 1e-12 <= layer_q(sums, p, eta) <= 0.998 + 1e-12


def test_abs_variant_gives_negative_rows_the_interior_optimum_the_spec_saturates() -> None:
    p, eta = 0.99, 0.5
    k, phi_p = 1 - p, phi(p)
    # S2 chosen so the interior optimum q* = ηΦ(p)S2/(2k|S1|) is 0.2 for |S1| = 1.
    s2 = 0.2 * 2 * k / (eta * phi_p)
    sums = RowSums(
        torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([s2, s2], dtype=torch.float64)
    )
    signed = row_q(sums, p, eta, signed=True)
    absolute = row_q(sums, p, eta, signed=False)
    assert float(signed[0]) == pytest.approx(0.2, abs=1e-3)
    # As specified, the negative row's objective only falls with q (ηS1 = -0.5 never cancels ln 40).
    assert float(signed[1]) == pytest.approx(0.998)
    assert float(absolute[0]) == float(absolute[1]) == float(signed[0])


def _compress_at_eta(base: Path, finetuned: Path, out: Path, q_mode: str) -> CompressResult:
    """p = 0.99 with η fixed at 0.5 and small calibration batches."""
    options = CompressOptions(
        base,
        finetuned,
        out,
        drop_rate=0.99,
        q_mode=q_mode,
        eta=0.5,
        calibration_samples=2,
        calibration_tokens=16,
    )
    return compress(options)


def test_per_layer_abs_q_mode_compresses_and_records_its_mode(
    tiny_bert_dir: Path, tiny_bert_classifier_dir: Path, tmp_path: Path
) -> None:
    r = _compress_at_eta(
        tiny_bert_dir, tiny_bert_classifier_dir, tmp_path / "abs.safetensors", "per-layer-abs"
    )
    c = r.manifest.calibration
    assert c is not None and c.details["q_mode"] == "per-layer-abs" and c.details["eta"] == 0.5


def test_phi_and_non_linear_tensors_get_the_mean_layer_q() -> None:
    assert phi(0.5) == 0.5 and phi(0.99) == pytest.approx(0.98 / math.log(99))
    gen = torch.Generator().manual_seed(0)
    sums = {"a": RowSums.zeros(8), "b": RowSums.zeros(8)}
    for s in sums.values():
        s.add_weight_(torch.randn(8, 4, generator=gen), torch.randn(4, generator=gen))
    qs = per_tensor_q(
        sums,
        {"a": ("a.weight", "a.bias"), "b": ("b.weight",)},
        ("a.weight", "a.bias", "b.weight", "emb"),
        0.9,
        0.5,
    )
    assert qs["a.weight"] == qs["a.bias"] == layer_q(sums["a"], 0.9, 0.5)
    assert qs["emb"] == pytest.approx((qs["a.weight"] + qs["b.weight"]) / 2)


def test_per_layer_compress_records_q_per_tensor(
    tiny_bert_dir: Path, tiny_bert_classifier_dir: Path, tmp_path: Path
) -> None:
    p = 0.99
    r = compress(
        CompressOptions(
            tiny_bert_dir,
            tiny_bert_classifier_dir,
            tmp_path / "pl.safetensors",
            drop_rate=p,
            q_mode="per-layer",
            calibration_samples=2,
            calibration_tokens=16,
        )
    )
    m = r.manifest
    assert m.q is None and m.calibration is not None
    details = m.calibration.details
    assert details["q_mode"] == "per-layer" and details["eta"] > 0 and details["layer_q"]
    assert len(m.calibration.grid) >= 2 and m.calibration.score == min(s for _, s in m.calibration.grid)
    scales = {n: e.scale for n, e in m.params.items() if e.kind == "sparse"}
    assert all(s is not None and 1 / 0.998 - 1e-9 <= s <= 1 / (1 - p) + 1e-9 for s in scales.values())
    layer = "bert.encoder.layer.0.attention.self.query"
    assert scales[f"{layer}.weight"] == pytest.approx(1 / details["layer_q"][layer])
    assert scales[f"{layer}.weight"] == scales[f"{layer}.bias"]
    summary = manifest_summary(m, r.file_bytes)
    low, high = (float(v) for v in str(summary["q_per_tensor"]).split(".."))
    assert summary["q"] is None and low == pytest.approx(min(1 / s for s in scales.values()), rel=1e-3)
    assert high == pytest.approx(max(1 / s for s in scales.values()), rel=1e-3)


def test_best_q_mode_compares_global_and_per_layer(
    tiny_bert_dir: Path, tiny_bert_classifier_dir: Path, tmp_path: Path
) -> None:
    r = _compress_at_eta(tiny_bert_dir, tiny_bert_classifier_dir, tmp_path / "b.safetensors", "best")
    c = r.manifest.calibration
    assert c is not None and set(c.details["compared"]) == {"global", "per-layer"}
    assert c.score == min(c.details["compared"].values())


def test_per_layer_needs_a_searched_q(
    tiny_bert_dir: Path, tiny_bert_classifier_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="q mode"):
        compress(
            CompressOptions(
                tiny_bert_dir, tiny_bert_classifier_dir, tmp_path / "x.safetensors", q=0.5, q_mode="per-layer"
            )
        )


def test_grid_search_skips_repeated_candidates_without_losing_patience() -> None:
    from deltas_store.compression.qsearch import grid_search

    # A plateau of identical candidates below x = 1 (e.g. η values giving the same q's), the optimum at 1.5.
    def key(x: float) -> float:
        return max(round(x, 6), 1.0)

    calls: list[float] = []

    def score(x: float) -> float:
        calls.append(x)
        return (max(x, 1.0) - 1.5) ** 2

    result = grid_search(score, -3.0, 2.0, coarse_step=0.25, key=key)
    assert abs(result.q - 1.5) < 0.03
    assert sum(1 for x in calls if x <= 1.0) == 1  # the plateau was scored once
