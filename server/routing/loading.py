"""Turning a served delta name into a PreparedDelta for the resident weights, through the cache."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from deltas_store import Delta, PreparedDelta, check_base, prepare_delta, read_delta
from server.routing.cache import CacheKey, DeltaCache
from server.routing.registry import Registry


class DeltaLoader:
    """Loads, verifies and prepares deltas on a cache miss; every check runs before any weight is touched."""

    def __init__(
        self, registry: Registry, cache: DeltaCache, weights: Mapping[str, torch.Tensor], fingerprint: str
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.weights = weights
        self.fingerprint = fingerprint

    def load(self, model: str) -> tuple[CacheKey | None, PreparedDelta | None]:
        """(key, prepared) for `model`, or (None, None) for the base. Raises the store's typed errors."""
        ref = self.registry.resolve(model, include_retiring=True)
        key = ref.key
        if ref.stored is None or key is None:
            return None, None
        prepared = self.cache.get(key)
        if prepared is None:
            prepared = self.prepare(read_delta(ref.stored.path))
            self.cache.put(key, prepared)
        return key, prepared

    def prepare(self, delta: Delta) -> PreparedDelta:
        """check_base + prepare_delta: raises BaseMismatchError / ArchitectureMismatchError, touches nothing."""
        check_base(delta.manifest, self.fingerprint)
        return prepare_delta(delta, self.weights)
