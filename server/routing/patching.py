"""Hot swap of the resident weights: at most one delta patched in at a time, restored exactly before the next."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from deltas_store import PreparedDelta, apply_delta_, restore_
from server.engine.packing import FlatWeights
from server.metrics import ServerMetrics
from server.routing.cache import CacheKey
from server.routing.flat import DEFAULT_KERNEL, WRITE_KERNELS, FlatDelta, WriteKernel, gather_bits
from server.routing.served import ServedDelta


class SwapManager:
    """Owns which delta the resident weights carry; only the scheduler's worker thread calls it.

    Swaps are lazy: a delta stays patched in until another model needs the weights, so consecutive
    batches of one delta pay no swap. Restoring writes saved originals back (bit-exact, never subtracts).
    With `flat` weights, applying is one scatter of the delta's precomputed patched values and restoring
    one scatter of its originals; `full_base` (the pristine base on the host) turns on the naive baseline
    that copies a whole fine-tuned weight set per switch.

    Example:
        >>> swaps.activate(("math", 1), served)  # doctest: +SKIP
        >>> swaps.activate(None, None)  # back to the base, bit-identical  # doctest: +SKIP
    """

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        metrics: ServerMetrics,
        flat: FlatWeights | None = None,
        *,
        kernel: WriteKernel | None = None,
        full_base: torch.Tensor | None = None,
    ) -> None:
        self.weights = weights
        self.flat = flat
        self.kernel = kernel or WRITE_KERNELS[DEFAULT_KERNEL]
        self.full_base = full_base
        self._metrics = metrics
        self._active: CacheKey | None = None
        self._undo: Callable[[], None] | None = None
        self._patched: FlatDelta | None = None  # the flat delta patched in now (for base_values)
        self._whole = False  # True while the weights are something else entirely (per-tensor / full copy)

    @property
    def active(self) -> CacheKey | None:
        """(name, version) of the delta patched in now; None = the pure base."""
        return self._active

    def activate(self, key: CacheKey | None, served: ServedDelta | None) -> None:
        """Make the weights equal base + `served` (or the base when `key` is None)."""
        if key == self._active:
            return
        if self.flat is not None and served is not None and served.full is not None:
            self._copy_full(key, served.full)
            return
        self.deactivate()
        if key is None or served is None:
            return
        start = time.perf_counter()
        self._undo = self._patch(served)  # restores itself if it fails midway
        self._active = key
        self._observe(start)

    def deactivate(self) -> None:
        """Restore the pure base weights."""
        if self._undo is None:
            return
        start = time.perf_counter()
        undo, self._undo, self._active = self._undo, None, None
        self._patched, self._whole = None, False
        undo()
        self._observe(start)

    def base_values(self, index: torch.Tensor) -> torch.Tensor:
        """The pristine base's values at sorted flat positions `index`, whatever is patched in now.

        Worker thread only (it reads the weights). Positions a patched-in delta changed are read from its
        originals, so loading a delta never needs a restore.
        """
        if self.flat is None:
            raise ValueError("base_values needs flat weights")
        if self.full_base is not None:  # the naive baseline keeps the pristine base on the host anyway
            return gather_bits(self.full_base, index.cpu()).to(self.flat.buffer.device)
        if self._whole:
            self.deactivate()
        values = gather_bits(self.flat.buffer, index)
        active = self._patched
        if active is not None and active.index.numel() and index.numel():
            at = torch.searchsorted(active.index, index).clamp(max=active.index.numel() - 1)
            hit = active.index[at] == index
            values[hit] = active.originals[at[hit]]
        return values

    def forget(self, name: str) -> None:
        """Restore the base if any version of delta `name` is patched in (it is being deleted)."""
        if self._active is not None and self._active[0] == name:
            self.deactivate()

    def trial(self, prepared: PreparedDelta) -> None:
        """Apply and restore once (an upload's test-apply); the weights end as they began."""
        restore_(apply_delta_(self.weights, prepared))
        self._sync()

    def _patch(self, served: ServedDelta) -> Callable[[], None]:
        """Patch `served` in; returns the undo that writes the saved originals back."""
        if served.flat is not None and self.flat is not None:
            return self._patch_flat(self.flat.buffer, served.flat)
        if served.prepared is None:
            raise ValueError(f"delta {served.name!r} has no layout for these weights")
        saved = apply_delta_(self.weights, served.prepared)
        self._whole = True
        return lambda: restore_(saved)

    def _patch_flat(self, buffer: torch.Tensor, delta: FlatDelta) -> Callable[[], None]:
        kernel = self.kernel

        def write(values: torch.Tensor) -> None:
            kernel.write_(buffer, delta.index, values, delta.runs)

        write(delta.patched)  # one scatter: the whole model's changes
        if delta.dense is None:
            self._patched = delta
            return lambda: write(delta.originals)
        try:
            dense_saved = apply_delta_(self.weights, delta.dense)
        except BaseException:
            write(delta.originals)  # never leave half-swapped weights
            raise
        self._whole = True  # whole tensors replaced: base_values restores first

        def undo() -> None:
            restore_(dense_saved)
            write(delta.originals)

        return undo

    def _copy_full(self, key: CacheKey | None, full: torch.Tensor) -> None:
        """The naive baseline: overwrite every resident parameter with a whole fine-tuned weight set."""
        if self.flat is None or self.full_base is None:
            raise ValueError("the full-copy baseline needs flat weights and the base's host copy")
        start = time.perf_counter()
        buffer, base = self.flat.buffer, self.full_base
        buffer.copy_(full, non_blocking=True)

        def undo() -> None:
            buffer.copy_(base, non_blocking=True)

        self._undo = undo
        self._active, self._patched, self._whole = key, None, True
        self._observe(start)

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
