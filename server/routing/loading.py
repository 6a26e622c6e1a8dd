"""Turning a served delta name into a ServedDelta for the resident weights, through the cache."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from deltas_store import Delta, PreparedDelta, check_base, prepare_delta, read_delta
from server.engine.mixed.modules import ParamUses
from server.engine.packing import FlatWeights
from server.routing.cache import CacheKey, DeltaCache
from server.routing.flat import BaseValues
from server.routing.registry import Registry
from server.routing.served import ServedDelta, serve_delta


class DeltaLoader:
    """Loads, verifies and lays out deltas on a cache miss; every check runs before any weight is touched.

    With `flat` weights and `base_values` (the swap manager's reader of the pristine base), deltas are
    laid out for one-scatter swaps; `uses` (set when mixed batches are on) adds each delta's mixed layout;
    `full_base` (the naive full-copy baseline only) adds its whole fine-tuned weight set. Worker thread
    only: laying out reads the resident weights.
    """

    def __init__(
        self,
        registry: Registry,
        cache: DeltaCache,
        weights: Mapping[str, torch.Tensor],
        fingerprint: str,
        *,
        flat: FlatWeights | None = None,
        base_values: BaseValues | None = None,
        uses: ParamUses | None = None,
        full_base: torch.Tensor | None = None,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.weights = weights
        self.fingerprint = fingerprint
        self.flat = flat
        self.base_values = base_values
        self.uses = uses
        self.full_base = full_base

    def load(self, model: str) -> tuple[CacheKey | None, ServedDelta | None]:
        """(key, served) for `model`, or (None, None) for the base. Raises the store's typed errors."""
        ref = self.registry.resolve(model, include_retiring=True)
        key = ref.key
        if ref.stored is None or key is None:
            return None, None
        cached = self.cache.get(key)
        if isinstance(cached, ServedDelta):
            return key, cached
        served = self.serve(cached if cached is not None else self.prepare(read_delta(ref.stored.path)))
        self.cache.put(key, served)
        return key, served

    def prepare(self, delta: Delta) -> PreparedDelta:
        """check_base + prepare_delta: raises BaseMismatchError / ArchitectureMismatchError, touches nothing."""
        check_base(delta.manifest, self.fingerprint)
        return prepare_delta(delta, self.weights)

    def serve(self, prepared: PreparedDelta) -> ServedDelta:
        """Lay a prepared (validated) delta out for the swap path and mixed batches; writes no weight."""
        return serve_delta(
            prepared, self.weights, self.flat, self.uses, self.base_values, full_base=self.full_base
        )
