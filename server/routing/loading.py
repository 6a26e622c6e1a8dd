"""Turning a served delta name into a ServedDelta for the resident weights, through the cache."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from deltas_store import Delta, DeltaStoreError, PreparedDelta, check_base, prepare_delta, read_delta
from server.engine.mixed.modules import ParamUses
from server.engine.packing import FlatWeights
from server.engine.threads import on_fresh_thread
from server.errors import ServerError
from server.routing.cache import CacheKey, DeltaCache
from server.routing.flat import BaseValues
from server.routing.registry import Registry
from server.routing.served import ServedDelta, serve_delta

log = logging.getLogger(__name__)


class DeltaLoader:
    """Loads, verifies and lays out deltas on a cache miss; every check runs before any weight is touched.

    With `flat` weights and `base_values` (the swap manager's reader of the pristine base), deltas are
    laid out for one-scatter swaps; `uses` (set when mixed batches are on) adds each delta's mixed layout;
    `full_base` (the naive full-copy baseline only) adds its whole fine-tuned weight set. `load` is for the
    worker thread only (laying out reads the resident weights); `ready` may start reading a delta that is
    only on disk on a background thread (read, verify, prepare: no weight is read), so the scheduler can
    serve other models meanwhile instead of stalling every request behind one cold load.
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
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="deltaserve-prefetch")
        self._inflight: dict[CacheKey, Future[PreparedDelta]] = {}
        self._lock = threading.Lock()

    def ready(self, model: str, on_ready: Callable[[], None]) -> bool:
        """Whether `model` can be served now without reading its file on the worker thread.

        If not, starts reading it in the background (once) and calls `on_ready` (from that thread) when
        done, whether it worked or not. A model that cannot be resolved is ready: `load` raises its error.
        """
        try:
            ref = self.registry.resolve(model, include_retiring=True)
        except (ServerError, DeltaStoreError, OSError):
            return True
        key = ref.key
        if ref.stored is None or key is None or self.cache.get(key) is not None:
            return True
        with self._lock:
            future = self._inflight.get(key)
            if future is not None:  # done but not cached (over budget, or failed): `load` takes it from here
                return future.done()
            # each read on a thread of its own that ends with it (server.engine.threads)
            future = self._prefetcher.submit(on_fresh_thread, self._read, key, ref.stored.path)
            self._inflight[key] = future
        future.add_done_callback(lambda _f: on_ready())
        return future.done()  # it may already be (then the callback ran here)

    def _read(self, key: CacheKey, path: Path) -> PreparedDelta:
        try:
            prepared = self.prepare(read_delta(path))
        except Exception as exc:
            log.warning("cannot load %s v%d: %s", key[0], key[1], exc)
            raise
        if self.cache.put(key, prepared):
            with self._lock:  # served from the cache from now on: the future need not hold it too
                self._inflight.pop(key, None)
        return prepared

    def close(self) -> None:
        self._prefetcher.shutdown(wait=False, cancel_futures=True)

    def load(self, model: str) -> tuple[CacheKey | None, ServedDelta | None]:
        """(key, served) for `model`, or (None, None) for the base. Raises the store's typed errors."""
        ref = self.registry.resolve(model, include_retiring=True)
        key = ref.key
        if ref.stored is None or key is None:
            return None, None
        cached = self.cache.get(key)
        if isinstance(cached, ServedDelta):
            return key, cached
        with self._lock:
            future = self._inflight.pop(key, None)
        if cached is None and future is not None and future.done() and future.exception() is None:
            cached = future.result()  # read in the background but too large to cache
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
