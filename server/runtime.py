"""Everything heavy one app serves with, built once in the lifespan: model, engine, store, cache, scheduler."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

from deltas_store import DeltaStore, ModelDir, base_fingerprint, embedded_base_dir, native
from server.engine.generator import Engine
from server.engine.mixed.batch import MixedBatch
from server.engine.mixed.modules import find_param_uses
from server.engine.model import load_model
from server.engine.packing import host_clone
from server.metrics import ServerMetrics
from server.routing.admin import DeltaAdmin
from server.routing.cache import DeltaCache
from server.routing.loading import DeltaLoader
from server.routing.patching import SwapManager
from server.routing.policy import BatchPolicy
from server.routing.registry import Registry
from server.routing.scheduler import Scheduler
from server.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """The loaded base model and the machinery around it; `app.state.runtime` once ready."""

    settings: ServerSettings
    metrics: ServerMetrics
    engine: Engine
    base_id: str
    fingerprint: str
    store: DeltaStore
    registry: Registry
    cache: DeltaCache
    swaps: SwapManager
    scheduler: Scheduler
    admin: DeltaAdmin
    started: int  # unix time the base finished loading

    def refresh_metrics(self) -> None:
        """Gauges that are cheaper to read at scrape time than to keep current."""
        self.metrics.cache_bytes.set(self.cache.nbytes)
        self.metrics.resident.clear()
        for name, _ in self.cache.cached():
            self.metrics.resident.labels(name).set(1)
        active = self.swaps.active
        if active is not None:
            self.metrics.resident.labels(active[0]).set(2)


def build_runtime(settings: ServerSettings, metrics: ServerMetrics) -> Runtime:
    """Load the base (blocking, seconds to minutes), open the store, and start the worker thread."""
    base_path = settings.base or embedded_base_dir()
    with ModelDir.open(base_path) as base_dir:
        fingerprint = base_fingerprint(base_dir)
        base_id = settings.model_id or base_dir.model_id
    loaded = load_model(base_path, settings.device, settings.dtype)
    log.info("loaded base %s on %s as %s", base_id, loaded.device, loaded.dtype)
    engine = Engine(loaded, observer=metrics)
    weights = dict(loaded.model.named_parameters())
    store = DeltaStore(settings.store)
    registry = Registry(base_id, store)
    cache = DeltaCache(settings.cache_bytes)
    flat = loaded.flat
    full_base = None  # the naive baseline keeps the pristine base on the host to copy back
    if settings.swap_mode == "full" and flat is not None:
        full_base = host_clone(flat.buffer.detach())
        full_base = full_base.pin_memory() if flat.buffer.is_cuda else full_base
    swaps = SwapManager(weights, metrics, flat, full_base=full_base)
    uses = find_param_uses(loaded.model) if settings.batch_mode != "merged" else None
    loader = DeltaLoader(
        registry, cache, weights, fingerprint, flat=flat, base_values=swaps.base_values, uses=uses,
        full_base=full_base,
    )  # fmt: skip
    mixer = functools.partial(MixedBatch, loaded.model, uses) if uses is not None else None
    if mixer is not None and loaded.device.type == "cpu":
        native.build_in_background()  # the C++ side kernel; mixed batches use torch ops until it lands
    scheduler = Scheduler(
        engine,
        swaps,
        loader,
        metrics,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_wait_s=settings.max_wait_ms / 1000.0,
        retry_after_s=settings.retry_after_s,
        policy=BatchPolicy(settings.batch_mode, max_density=settings.mixed_max_density),
        mixer=mixer,
        continuous=settings.continuous_batching,
    )
    admin = DeltaAdmin(store, registry, cache, loader, swaps, scheduler)
    scheduler.start()
    return Runtime(
        settings,
        metrics,
        engine,
        base_id,
        fingerprint,
        store,
        registry,
        cache,
        swaps,
        scheduler,
        admin,
        int(time.time()),
    )
