"""The coarse-to-fine q grid search."""

from __future__ import annotations

import pytest

from deltas_store.compression.qsearch import grid_search, search_q


@pytest.mark.parametrize("optimum", [0.013, 0.3, 0.62, 1.0])
def test_finds_minimum_of_quadratic(optimum: float) -> None:
    result = search_q(lambda q: (q - optimum) ** 2, density=0.01)
    assert abs(result.q - optimum) <= 0.005 / 2 + 1e-9
    assert result.score == min(s for _, s in result.grid)


def test_q_equal_density_first_and_never_below() -> None:
    result = search_q(lambda q: q, density=0.1)
    assert result.grid[0][0] == pytest.approx(0.1)
    assert result.q == pytest.approx(0.1)
    assert all(q >= 0.1 for q, _ in result.grid)


def test_coarse_pass_stops_after_patience() -> None:
    calls: list[float] = []

    def score(q: float) -> float:
        calls.append(q)
        return (q - 0.2) ** 2

    search_q(score, density=0.01, patience=4)
    assert max(calls) < 0.5  # 4 non-improvements past ~0.21, not the whole way to 1.0


def test_a_flat_start_stops_an_impatient_search_but_not_a_full_pass() -> None:
    # The shape the per-layer η search meets: small η all give (nearly) the same score, the optimum lies far up.
    def score(x: float) -> float:
        return 1.0 if x < 2.0 else (x - 3.0) ** 2 / 10.0

    impatient = grid_search(score, -3.0, 4.0, coarse_step=0.25, patience=4)
    assert impatient.q < 2.0  # stuck on the plateau
    full = grid_search(score, -3.0, 4.0, coarse_step=0.25, patience=29)
    assert full.q == pytest.approx(3.0, abs=0.03)
