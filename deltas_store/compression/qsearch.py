"""The coarse-to-fine 1-D grid search for DAREx-q's rescaling factor q (pure: takes a score function)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

Goal = Literal["min", "max"]


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
    goal: Goal = "min",
) -> QSearchResult:
    """Optimise `score(q)` over q in [density, 1]: coarse pass from q = density, then a `refine`x finer pass.

    goal "min" for a label-free output change, "max" for a labeled validation metric. Each pass stops after
    `patience` consecutive non-improvements (ALGORITHMS.md). q = density is DARE. Example::

        search_q(lambda q: (q - 0.3) ** 2, density=0.01).q  # ~0.3
    """
    return grid_search(
        score, density, 1.0, coarse_step=coarse_step, refine=refine, patience=patience, goal=goal
    )


def grid_search(
    score: Callable[[float], float],
    low: float,
    high: float,
    *,
    coarse_step: float,
    refine: int = 10,
    patience: int = 4,
    goal: Goal = "min",
    key: Callable[[float], Hashable] | None = None,
) -> QSearchResult:
    """Coarse pass upwards from `low` in `coarse_step`s, then a `refine`x finer pass both ways around the best.

    key: points with the same key are the same candidate (e.g. η values that give identical per-layer q's);
    one already scored is skipped and counts neither as an improvement nor against `patience`.
    """
    sign = 1.0 if goal == "min" else -1.0
    seen: dict[float, float] = {}
    keys: set[Hashable] = set()

    def evaluate(x: float) -> float | None:
        x = round(min(max(x, low), high), 6)
        if x not in seen:
            k = key(x) if key is not None else x
            if k in keys:
                return None
            keys.add(k)
            seen[x] = score(x)
        return sign * seen[x]

    best_x, first = low, evaluate(low)
    best = first if first is not None else float("inf")
    misses, x = 0, low
    while x < high and misses < patience:
        x = min(x + coarse_step, high)
        s = evaluate(x)
        if s is None:
            continue
        if s < best:
            best_x, best, misses = x, s, 0
        else:
            misses += 1
    fine = coarse_step / refine
    for direction in (1.0, -1.0):
        misses, x = 0, best_x
        while misses < patience:
            x = round(x + direction * fine, 6)
            if x < low or x > high:
                break
            s = evaluate(x)
            if s is None:
                continue
            if s < best:
                best_x, best, misses = x, s, 0
            else:
                misses += 1
    return QSearchResult(round(min(max(best_x, low), high), 6), sign * best, tuple(seen.items()))


def robust_mean(scores: Sequence[float]) -> float:
    """The mean over mask seeds, the outlier seed dropped when there are at least three (paper: 4 seeds).

    The outlier is the score farthest from the median of all of them.
    """
    if not scores:
        raise ValueError("no scores to average")
    values = list(scores)
    if len(values) >= 3:
        ordered = sorted(values)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        values.pop(max(range(len(values)), key=lambda i: abs(values[i] - median)))
    return sum(values) / len(values)
