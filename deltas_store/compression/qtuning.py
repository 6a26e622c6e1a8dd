"""Searching DAREx-q's rescaling on a live model: global q (label-free or labeled, averaged over mask seeds)
and per-layer analytic q (Algorithm 3) with its η grid-searched the same way.

A `Candidate` is the fine-tune's model with every pruned parameter reset to the base; scoring a rescaling
patches base + kept·scale in, runs the objective, and writes the base values back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deltas_store.compression import perlayer
from deltas_store.compression.qsearch import Goal, QSearchResult, grid_search, robust_mean, search_q

# η from 1e-3 to 1e4. The paper's BERT values (0.27–1.01) lie inside; a gentle fine-tune's c = δ·x̄ sums are
# orders of magnitude smaller, and η only matters once η·Σc nears ln(2/0.05), so the range reaches far up.
ETA_LOG10_RANGE = (-3.0, 4.0)
ETA_LOG10_STEP = 0.25


@dataclass(frozen=True)
class Objective:
    """What a rescaling is judged by: a function of the candidate model, minimised or maximised."""

    metric: str
    goal: Goal
    fn: Callable[[torch.nn.Module], float]
    source: str


@dataclass(frozen=True)
class Kept:
    """One mask seed's kept entries of one parameter: sorted flat indices and float32 deltas."""

    indices: torch.Tensor  # (nnz,) int64
    delta: torch.Tensor  # (nnz,) float32


@dataclass
class Candidate:
    """The model to score rescalings on; its pruned parameters must hold the base's values."""

    model: torch.nn.Module
    masks: Sequence[Mapping[str, Kept]]  # one mapping per mask seed: parameter name -> kept entries
    evaluations: int = 0
    on_evaluate: Callable[[], None] | None = None

    def score(self, objective: Objective, scales: Callable[[str], float]) -> tuple[float, list[float]]:
        """The seed-averaged objective (outlier seed dropped) and each seed's score."""
        weights = dict(self.model.named_parameters())
        per_seed: list[float] = []
        for kept in self.masks:
            saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            with torch.no_grad():
                for name, k in kept.items():
                    flat = weights[name].view(-1)
                    original = flat.index_select(0, k.indices)
                    saved.append((flat, k.indices, original))
                    flat.index_copy_(0, k.indices, original + k.delta * scales(name))
            try:
                per_seed.append(float(objective.fn(self.model)))
            finally:
                with torch.no_grad():
                    for flat, idx, original in saved:
                        flat.index_copy_(0, idx, original)
                self.evaluations += 1
                if self.on_evaluate is not None:
                    self.on_evaluate()
        return robust_mean(per_seed), per_seed


@dataclass(frozen=True)
class Rescaling:
    """The outcome: a global q (or None when per tensor), the scale of every pruned tensor, what was measured."""

    q: float | None
    scales: dict[str, float]
    score: float
    grid: tuple[tuple[float, float], ...]
    details: dict[str, Any] = field(default_factory=dict)


def search_global_q(candidate: Candidate, objective: Objective, density: float) -> Rescaling:
    """One q for every tensor, on the coarse-to-fine grid from q = k (DARE) to 1."""
    per_seed: dict[float, list[float]] = {}

    def score(q: float) -> float:
        mean, seeds = candidate.score(objective, lambda _name: 1.0 / q)
        per_seed[q] = seeds
        return mean

    result = search_q(score, density, goal=objective.goal)
    names = {n for kept in candidate.masks for n in kept}
    details: dict[str, Any] = {"q_mode": "global", "mask_seeds": len(candidate.masks), "goal": objective.goal}
    if len(candidate.masks) > 1:
        details["per_seed"] = [[q, s] for q, s in per_seed.items()]
    return Rescaling(
        result.q, dict.fromkeys(sorted(names), 1.0 / result.q), result.score, result.grid, details
    )


def search_eta(
    candidate: Candidate,
    objective: Objective,
    sums: Mapping[str, perlayer.RowSums],
    tensors_of: Mapping[str, tuple[str, ...]],
    drop_rate: float,
    eta: float | None = None,
    signed: bool = True,
) -> Rescaling:
    """Per-layer q (Algorithm 3) for each η on a log grid, coarse to fine; or for one given η.

    signed=False uses |Σc| per row (the "per-layer-abs" q mode, see perlayer.py)."""
    names = tuple(sorted({n for kept in candidate.masks for n in kept}))
    qs_of: dict[float, dict[str, float]] = {}

    def qs(log_eta: float) -> dict[str, float]:
        if log_eta not in qs_of:
            qs_of[log_eta] = perlayer.per_tensor_q(
                dict(sums), dict(tensors_of), names, drop_rate, 10.0**log_eta, signed
            )
        return qs_of[log_eta]

    def config(log_eta: float) -> tuple[float, ...]:
        # Different η often give the same q's (rows saturate at k or 0.998): such η are one candidate.
        per_tensor = qs(log_eta)
        return tuple(round(per_tensor[n], 6) for n in names)

    def score(log_eta: float) -> float:
        per_tensor = qs(log_eta)
        return candidate.score(objective, lambda n: 1.0 / per_tensor[n])[0]

    if eta is not None:
        log_eta = math.log10(eta)
        fixed = score(log_eta)
        result = QSearchResult(log_eta, fixed, ((log_eta, fixed),))
    else:
        low, high = ETA_LOG10_RANGE
        # The whole coarse range: small η give near-identical scores (flat, not worse), and stopping after a
        # few of them would never reach the η where the per-layer q's start to differ.
        patience = math.ceil((high - low) / ETA_LOG10_STEP) + 1
        result = grid_search(
            score, low, high, coarse_step=ETA_LOG10_STEP, goal=objective.goal, key=config, patience=patience
        )
    best = qs(result.q)
    layer_q = {layer: best[ts[0]] for layer, ts in tensors_of.items() if ts and ts[0] in best}
    grid = tuple((round(10.0**x, 6), s) for x, s in result.grid)
    details: dict[str, Any] = {
        "q_mode": "per-layer" if signed else "per-layer-abs",
        "eta": round(10.0**result.q, 6),
        "mask_seeds": len(candidate.masks),
        "goal": objective.goal,
        "mean_q_per_eta": [[round(10.0**x, 6), _mean(qs(x))] for x, _ in result.grid],
        "layer_q": {layer: round(q, 6) for layer, q in sorted(layer_q.items())},
    }
    return Rescaling(None, {n: 1.0 / q for n, q in best.items()}, result.score, grid, details)


def _mean(values: Mapping[str, float]) -> float:
    return round(sum(values.values()) / len(values), 6) if values else math.nan


def better(a: Rescaling, b: Rescaling, goal: Goal) -> Rescaling:
    """The better of two rescalings for this goal (the first on a tie)."""
    if goal == "min":
        return a if a.score <= b.score else b
    return a if a.score >= b.score else b
