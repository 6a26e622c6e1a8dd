"""The coarse-to-fine 1-D grid search for DAREx-q's rescaling factor q (pure: takes a score function)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class QSearchResult:
    q: float
    score: float
    grid: tuple[tuple[float, float], ...]  # every (q, score) evaluated, in order


def search_q(
    score: Callable[[float], float],
    density: float,
    *,
    coarse_step: float = 0.05,
    refine: int = 10,
    patience: int = 4,
) -> QSearchResult:
    """Minimise `score(q)` over q in [density, 1]: coarse pass from q = density, then a `refine`x finer pass.

    Each pass stops after `patience` consecutive non-improvements (ALGORITHMS.md). q = density is DARE.
    Example::

        search_q(lambda q: (q - 0.3) ** 2, density=0.01).q  # ~0.3
    """
    seen: dict[float, float] = {}

    def evaluate(q: float) -> float:
        q = round(min(max(q, density), 1.0), 6)
        if q not in seen:
            seen[q] = score(q)
        return seen[q]

    best_q, best = density, evaluate(density)
    misses, q = 0, density
    while q < 1.0 and misses < patience:
        q = min(q + coarse_step, 1.0)
        s = evaluate(q)
        if s < best:
            best_q, best, misses = q, s, 0
        else:
            misses += 1
    fine = coarse_step / refine
    for direction in (1.0, -1.0):
        misses, q = 0, best_q
        while misses < patience:
            q = round(q + direction * fine, 6)
            if q < density or q > 1.0:
                break
            s = evaluate(q)
            if s < best:
                best_q, best, misses = q, s, 0
            else:
                misses += 1
    return QSearchResult(round(min(max(best_q, density), 1.0), 6), best, tuple(seen.items()))
