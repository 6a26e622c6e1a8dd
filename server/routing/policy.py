"""When a batch runs merged (one delta patched into the weights) and when mixed (deltas as side terms)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from server.engine.mixed.layout import MixedDelta

BatchMode = Literal["auto", "merged", "mixed"]


@dataclass(frozen=True)
class BatchPolicy:
    """`merged`: batches of one model (a swap per switch). `mixed`: every mixable delta shares batches.

    `auto` serves a model merged only when its queue alone fills a whole batch: merged costs nothing per
    step once patched in, but a batch of one model leaves every other model's requests for later batches,
    while mixed costs a side product per row (growing with the delta's density) and serves them all in
    one pass. Measured on SmolLM2 (bench/results/serve-smollm2.md): with the C++ side kernel, merging a
    model that fills half a batch lost to mixing the queue.

    Example:
        >>> BatchPolicy("auto").merged_model("a", {"a": 6, "b": 1}, max_batch=8, overdue=False) is None
        True
        >>> BatchPolicy("auto").merged_model("b", {"a": 8, "b": 1}, max_batch=8, overdue=False)
        'a'
    """

    mode: BatchMode = "auto"
    dominance: float = 1.0  # auto: merged when one model's queue fills this share of a whole batch
    max_density: float = 0.05  # auto: deltas denser than this are served merged (side products too slow)

    def merged_model(
        self, picked: str, queued: Mapping[str, int], max_batch: int, overdue: bool
    ) -> str | None:
        """The model to serve in a merged batch next, or None to mix the models of `queued`.

        `picked` is the merged rule's choice (the model patched in now, or the longest-waiting one);
        `queued` maps each mixable model to its queue length (`picked` is absent when it cannot mix);
        `overdue`: some request has waited past the scheduler's bound, so no other model may jump ahead.
        """
        if self.mode == "merged" or picked not in queued:
            return picked
        if self.mode == "mixed":
            return None
        if len(queued) == 1:
            return picked  # nothing to mix with
        dominant = max(queued, key=lambda m: (queued[m], m == picked))
        share = queued[dominant] / max_batch
        if share >= self.dominance and (dominant == picked or not overdue):
            return dominant
        return None

    def mixable(self, delta: MixedDelta) -> bool:
        """Whether a delta with a mixed layout should be served mixed at all."""
        return self.mode == "mixed" or delta.density <= self.max_density
