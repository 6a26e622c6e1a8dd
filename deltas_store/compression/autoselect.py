"""`--method auto`: the paper's selection pipeline (ALGORITHMS.md, "Choosing a method") from measured delta
statistics and the calibration output change; it records what it measured and why it chose.

1. Fine-tuning under your control -> AdamR-L2 (deltas_store.AdamR), then DARE/DAREx-q. A given fine-tune is
   past that point, so `auto` only says so.
2. Large deltas (mean |δ| at least LARGE_RELATIVE_DELTA of mean |θ_B| over the pruned tensors: continued
   pre-training, a distant base) -> importance pruning: WANDA when calibration text was given, else magnitude.
3. Otherwise at p >= HIGH_DROP_RATE -> DAREx-q (labeled q when a metric is given, else label-free; for
   encoders both global and per-layer q are searched and the better kept, decoders use one global q).
   At moderate p -> DARE, unless DARE measurably collapses already (its output change is at least
   DARE_COLLAPSE_RATIO of dropping the whole delta), then DAREx-q.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

LARGE_RELATIVE_DELTA = 0.1
HIGH_DROP_RATE = 0.9
DARE_COLLAPSE_RATIO = 0.5


@dataclass
class DeltaStats:
    """Running statistics of the pruned deltas and of the base weights they apply to."""

    values: int = 0
    sum_abs_delta: float = 0.0
    sum_delta: float = 0.0
    sum_sq_delta: float = 0.0
    sum_abs_base: float = 0.0
    tensors: int = 0

    def add_(self, delta: torch.Tensor, base: torch.Tensor) -> None:
        d = delta.double()
        self.values += d.numel()
        self.sum_abs_delta += float(d.abs().sum())
        self.sum_delta += float(d.sum())
        self.sum_sq_delta += float(d.pow(2).sum())
        self.sum_abs_base += float(base.double().abs().sum())
        self.tensors += 1

    @property
    def mean_abs_delta(self) -> float:
        return self.sum_abs_delta / self.values if self.values else 0.0

    @property
    def std_delta(self) -> float:
        if not self.values:
            return 0.0
        mean = self.sum_delta / self.values
        return math.sqrt(max(self.sum_sq_delta / self.values - mean * mean, 0.0))

    @property
    def mean_abs_base(self) -> float:
        return self.sum_abs_base / self.values if self.values else 0.0

    @property
    def relative(self) -> float:
        """mean |δ| / mean |θ_B|: how far the fine-tune moved, relative to the weights themselves."""
        return self.mean_abs_delta / self.mean_abs_base if self.mean_abs_base else math.inf

    def as_dict(self) -> dict[str, float]:
        return {
            "pruned_tensors": self.tensors,
            "pruned_values": self.values,
            "mean_abs_delta": self.mean_abs_delta,
            "std_delta": self.std_delta,
            "mean_abs_base": self.mean_abs_base,
            "relative_delta": self.relative,
        }


@dataclass(frozen=True)
class AutoDecision:
    method: str
    q_mode: str
    reason: str
    measured: dict[str, Any] = field(default_factory=dict)


def decide(
    stats: DeltaStats,
    drop_rate: float,
    *,
    decoder: bool,
    has_calibration: bool,
    labeled: bool,
    base_output_change: float | None = None,
    dare_output_change: float | None = None,
) -> AutoDecision:
    """The method for these measurements; pure, so every branch is testable without a model.

    base_output_change: the label-free output change of dropping the whole delta (the base model);
    dare_output_change: that of DARE at this drop rate.
    """
    measured: dict[str, Any] = {**stats.as_dict(), "drop_rate": drop_rate, "decoder": decoder}
    ratio = None
    if base_output_change is not None and dare_output_change is not None:
        measured["base_output_change"] = base_output_change
        measured["dare_output_change"] = dare_output_change
        ratio = dare_output_change / base_output_change if base_output_change > 0 else math.inf
        measured["dare_to_base_output_change"] = ratio
    preface = "the fine-tune is given (AdamR-L2 applies only when you fine-tune yourself); "
    rel = f"mean |δ| / mean |θ_B| = {stats.relative:.4g}"
    if stats.relative >= LARGE_RELATIVE_DELTA:
        chosen = "wanda" if has_calibration else "magnitude"
        why = (
            "with the calibration text given"
            if has_calibration
            else "(no calibration text was given for WANDA)"
        )
        return AutoDecision(
            chosen,
            "none",
            f"{preface}{rel} >= {LARGE_RELATIVE_DELTA}: large deltas, where random pruning collapses; "
            f"importance pruning: {chosen} {why}",
            measured,
        )
    kind = "labeled" if labeled else "label-free"
    q_mode = "global" if decoder else "best"
    q_why = (
        "one global q (decoder)" if decoder else "global and per-layer q searched, the better kept (encoder)"
    )
    if drop_rate >= HIGH_DROP_RATE:
        return AutoDecision(
            "darex-q",
            q_mode,
            f"{preface}{rel} < {LARGE_RELATIVE_DELTA}: small deltas; p = {drop_rate:g} >= {HIGH_DROP_RATE}: "
            f"DAREx-q with {kind} q, {q_why}",
            measured,
        )
    if ratio is not None and ratio >= DARE_COLLAPSE_RATIO:
        return AutoDecision(
            "darex-q",
            q_mode,
            f"{preface}{rel}: small deltas at moderate p = {drop_rate:g}, but DARE's output change is "
            f"{ratio:.3g} of dropping the whole delta (>= {DARE_COLLAPSE_RATIO}): DAREx-q with {kind} q, {q_why}",
            measured,
        )
    shown = f" (DARE's output change is {ratio:.3g} of dropping the whole delta)" if ratio is not None else ""
    return AutoDecision(
        "dare",
        "none",
        f"{preface}{rel} < {LARGE_RELATIVE_DELTA}: small deltas at moderate p = {drop_rate:g}: DARE{shown}",
        measured,
    )
