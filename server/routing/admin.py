"""Adding and removing deltas while serving: validate and test-apply before a delta becomes visible."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from deltas_store import (
    Delta,
    DeltaStore,
    PreparedDelta,
    StoredDelta,
    manifest_summary,
    read_delta,
    validate_name,
)
from server.engine.threads import on_fresh_thread
from server.errors import NameConflictError
from server.routing.cache import DeltaCache
from server.routing.loading import DeltaLoader
from server.routing.patching import SwapManager
from server.routing.registry import Registry
from server.routing.scheduler import Scheduler
from server.routing.served import ServedDelta

log = logging.getLogger(__name__)


class DeltaAdmin:
    """The upload and delete flows of `/v1/deltas`, in the order that keeps the store and weights sound.

    Example:
        >>> stored = admin.add("math", staged_path)  # from a worker thread  # doctest: +SKIP
    """

    def __init__(
        self,
        store: DeltaStore,
        registry: Registry,
        cache: DeltaCache,
        loader: DeltaLoader,
        swaps: SwapManager,
        scheduler: Scheduler,
    ) -> None:
        self.store = store
        self.registry = registry
        self.cache = cache
        self.loader = loader
        self.swaps = swaps
        self.scheduler = scheduler

    def add(self, name: str, staged: Path) -> StoredDelta:
        """Verify `staged`, check it fits this base, test-apply it, then store it as the next version of `name`.

        Blocking (run it in a thread). Any failure raises a typed error and leaves the store unchanged;
        the staged file is taken over by the store on success.
        """
        validate_name(name)
        if name == self.registry.base_id:
            raise NameConflictError(f"{name!r} is the base model's id; choose another name", param="name")
        # integrity (checksums, keys, shapes, index bounds), then the right base and every name and shape
        # fits, on a thread that ends with them (server.engine.threads: one OpenMP pool, the worker's)
        delta, prepared = on_fresh_thread(self._check, staged)
        # The trial apply + restore and the layout (it reads the base) run on the worker between batches.
        served = self.scheduler.call(lambda: self._trial(prepared)).result()
        summary = manifest_summary(delta.manifest, staged.stat().st_size)
        stored = self.store.put(name, staged, summary=summary, move=True)
        self.cache.evict(name)  # an older version is stale now
        self.cache.put((name, stored.version), served)
        log.info("stored delta %s v%d (%d bytes)", name, stored.version, stored.size)
        return stored

    def _check(self, staged: Path) -> tuple[Delta, PreparedDelta]:
        delta = read_delta(staged)
        return delta, self.loader.prepare(delta)

    def _trial(self, prepared: PreparedDelta) -> ServedDelta:
        self.swaps.trial(prepared)
        return self.loader.serve(prepared)

    async def remove(self, name: str, drain_timeout_s: float) -> list[StoredDelta]:
        """Refuse new requests for `name`, let queued and running ones finish, then delete every version."""
        self.registry.resolve(name)  # 404 unless it is served now
        with self.registry.retiring(name):
            drained = await asyncio.to_thread(self.scheduler.wait_idle, name, drain_timeout_s)
            if not drained:
                log.warning("deleting %s while requests for it are still queued (drain timed out)", name)
            await asyncio.wrap_future(self.scheduler.call(lambda: self.swaps.forget(name)))
            removed: list[StoredDelta] = await asyncio.to_thread(self.store.delete, name)
            self.cache.evict(name)
        log.info("deleted delta %s (%d versions)", name, len(removed))
        return removed
