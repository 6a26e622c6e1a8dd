"""Hot swap of the resident weights: at most one delta patched in at a time, restored exactly before the next."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from deltas_store import PreparedDelta, SavedOriginals, apply_delta_, restore_
from server.metrics import ServerMetrics
from server.routing.cache import CacheKey


class SwapManager:
    """Owns which delta the resident weights carry; only the scheduler's worker thread calls it.

    Swaps are lazy: a delta stays patched in until another model needs the weights, so consecutive
    batches of one delta pay no swap. Restoring writes saved originals back (bit-exact, never subtracts).

    Example:
        >>> swaps.activate(("math", 1), prepared)  # doctest: +SKIP
        >>> swaps.activate(None, None)  # back to the base, bit-identical  # doctest: +SKIP
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], metrics: ServerMetrics) -> None:
        self.weights = weights
        self._metrics = metrics
        self._active: CacheKey | None = None
        self._saved: SavedOriginals | None = None

    @property
    def active(self) -> CacheKey | None:
        """(name, version) of the delta patched in now; None = the pure base."""
        return self._active

    def activate(self, key: CacheKey | None, prepared: PreparedDelta | None) -> None:
        """Make the weights equal base + `prepared` (or the base when `key` is None)."""
        if key == self._active:
            return
        self.deactivate()
        if key is None or prepared is None:
            return
        start = time.perf_counter()
        self._saved = apply_delta_(self.weights, prepared)  # restores itself if it fails midway
        self._active = key
        self._observe(start)

    def deactivate(self) -> None:
        """Restore the pure base weights."""
        if self._saved is None:
            return
        start = time.perf_counter()
        saved, self._saved, self._active = self._saved, None, None
        restore_(saved)
        self._observe(start)

    def forget(self, name: str) -> None:
        """Restore the base if any version of delta `name` is patched in (it is being deleted)."""
        if self._active is not None and self._active[0] == name:
            self.deactivate()

    def trial(self, prepared: PreparedDelta) -> None:
        """Apply and restore once (an upload's test-apply); the weights end as they began."""
        restore_(apply_delta_(self.weights, prepared))
        self._sync()

    def _observe(self, start: float) -> None:
        self._sync()
        self._metrics.swaps.inc()
        self._metrics.swap_seconds.observe(time.perf_counter() - start)

    def _sync(self) -> None:
        # Kernels run asynchronously on CUDA; time (and fail) the swap here, not in the next forward.
        for weight in self.weights.values():
            if weight.is_cuda:
                torch.cuda.synchronize(weight.device)
            return
