"""The coarse-to-fine q grid search."""

from __future__ import annotations

import pytest

from deltas_store.compression.qsearch import search_q


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
