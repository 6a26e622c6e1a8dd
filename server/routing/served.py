"""A delta as the server keeps it in memory: checked, laid out for hot swap and (when it can) mixed batches."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from deltas_store import PreparedDelta
from server.engine.mixed.layout import MixedDelta, build_mixed
from server.engine.mixed.modules import ParamUses
from server.engine.packing import FlatWeights, host_clone
from server.routing.flat import BaseValues, FlatDelta, ScatterBits, flatten_delta


@dataclass(frozen=True)
class ServedDelta:
    """One loaded delta; exactly one of `flat` / `prepared` is set (the swap layout).

    `mixed` is None when the delta changes a parameter no side term reproduces (then it is only served
    merged); `full` is set only for the naive full-copy baseline (`swap_mode=full`).
    """

    name: str
    flat: FlatDelta | None  # patch the whole model in one scatter
    prepared: PreparedDelta | None  # fallback: per-tensor patching with deltas_store's functions
    mixed: MixedDelta | None
    full: torch.Tensor | None = None  # (numel,) every resident parameter as base + delta, on the host

    @property
    def nbytes(self) -> int:
        parts = (
            self.flat.nbytes if self.flat is not None else 0,
            self.prepared.nbytes if self.prepared is not None else 0,
            self.mixed.nbytes if self.mixed is not None else 0,
            self.full.nbytes if self.full is not None else 0,
        )
        # The mixed layout shares the flat values when the dtypes agree; count them once.
        return sum(parts) - self._shared_bytes()

    @property
    def device(self) -> torch.device:
        if self.flat is not None:
            return self.flat.values.device
        ops = self.prepared.ops if self.prepared is not None else ()
        return ops[0].values.device if ops else torch.device("cpu")

    def _shared_bytes(self) -> int:
        if self.flat is None or self.mixed is None:
            return 0
        base = self.flat.values.untyped_storage().data_ptr()
        return sum(
            m.values.nbytes
            for m in self.mixed.matrices.values()
            if m.values.untyped_storage().data_ptr() == base
        )


def serve_delta(
    prepared: PreparedDelta,
    weights: Mapping[str, torch.Tensor],
    flat: FlatWeights | None,
    uses: ParamUses | None,
    base_values: BaseValues | None,
    *,
    full_base: torch.Tensor | None = None,
) -> ServedDelta:
    """Lay out a validated delta for the swap path and, when `uses` is given, for mixed batches.

    `base_values` reads the pristine base (the swap manager's); without it (or without `flat`) the delta
    is patched per tensor. `full_base` (the naive baseline only): the pristine base as one host buffer;
    the delta is then also materialized as the whole fine-tuned weight set that baseline copies per switch.
    """
    flat_delta = None
    if flat is not None and base_values is not None:
        flat_delta = flatten_delta(prepared, flat, base_values)
    mixed = None
    if uses is not None:
        views = _value_views(flat_delta) if flat_delta is not None else None
        mixed = build_mixed(prepared, uses, weights, views)
    full = None
    if full_base is not None and flat is not None and flat_delta is not None:
        full = _materialize(full_base, flat, flat_delta)
    return ServedDelta(prepared.name, flat_delta, None if flat_delta is not None else prepared, mixed, full)


def _value_views(flat_delta: FlatDelta) -> dict[str, torch.Tensor]:
    return {target: flat_delta.values[start:end] for target, (start, end) in flat_delta.spans.items()}


def _materialize(base: torch.Tensor, flat: FlatWeights, delta: FlatDelta) -> torch.Tensor:
    """Base + delta as one host buffer (the delta's patched values: the canonical arithmetic)."""
    full = host_clone(base)
    ScatterBits().write_(full, delta.index.cpu(), delta.patched.cpu())
    if delta.dense is not None:
        for op in delta.dense.ops:
            start = flat.offsets[op.target]
            full[start : start + op.values.numel()].copy_(op.values.reshape(-1))
    return full.pin_memory() if flat.buffer.is_cuda else full
