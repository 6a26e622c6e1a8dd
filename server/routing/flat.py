"""A prepared delta laid out over the flat resident weights: one sorted index, so a swap is one scatter.

The arithmetic is deltas_store.patching's (``w[i] = w[i] + v[i]`` in the weight's dtype, originals written
back, never subtracted); only the layout and the timing change. Every parameter's kept positions become
positions in `FlatWeights.buffer`, and because the base never changes, its values at those positions (the
originals) and the patched values are computed once, when the delta is loaded: applying is then one
scatter of the patched values, restoring one scatter of the originals, for the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from deltas_store import PreparedDelta, native
from server.engine.packing import FlatWeights

# The same-width integer dtype of each float dtype: moving bits through it is exact, and on CPU the
# integer gather/scatter kernels are much faster than the half-precision ones (bench/results/swap.md).
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}  # fmt: skip

BaseValues = Callable[[torch.Tensor], torch.Tensor]  # sorted flat positions -> the pristine base's values
# Kept positions are also stored as runs when they come in runs at least this long on average (block masks):
# a write then reads one start per run instead of one index per value.
RUN_MIN_MEAN = 4.0


@dataclass(frozen=True)
class Runs:
    """Sorted flat positions as maximal runs of consecutive positions: run r covers
    [starts[r], starts[r] + offsets[r + 1] - offsets[r]) and holds entries offsets[r]:offsets[r + 1]."""

    starts: torch.Tensor  # (R,) int64
    offsets: torch.Tensor  # (R + 1,) int64, offsets[0] = 0, offsets[R] = nnz

    @classmethod
    def of(cls, index: torch.Tensor) -> Runs:
        n = index.numel()
        begins = torch.ones(n, dtype=torch.bool, device=index.device)
        if n > 1:
            begins[1:] = index[1:] != index[:-1] + 1
        at = begins.nonzero().squeeze(1)
        return cls(index[at], torch.cat([at, torch.tensor([n], device=index.device)]))

    @property
    def count(self) -> int:
        return self.starts.numel()

    @property
    def nbytes(self) -> int:
        return self.starts.nbytes + self.offsets.nbytes


@dataclass(frozen=True)
class FlatDelta:
    """The sparse part of a PreparedDelta as global positions in `FlatWeights.buffer` (sorted, unique)."""

    # (nnz,) int64 flat positions, strictly increasing. int64, not int32: scatter_ runs 6-11% faster with
    # it on CPU (bench/results/swap.md), worth 4 more bytes per kept value.
    index: torch.Tensor
    values: torch.Tensor  # (nnz,) the kept delta values, buffer dtype and device, in `index` order
    originals: torch.Tensor  # (nnz,) the base's values there, gathered once: what `restore` writes
    patched: torch.Tensor  # (nnz,) originals + values in the weight dtype: what `apply` writes
    spans: Mapping[str, tuple[int, int]]  # target parameter -> [start, end) of its entries above
    dense: PreparedDelta | None  # whole-tensor replacements (rare), patched per tensor by deltas_store
    runs: Runs | None = None  # `index` as runs, when they are long enough to pay (RUN_MIN_MEAN)

    @property
    def nbytes(self) -> int:
        dense = self.dense.nbytes if self.dense is not None else 0
        tensors = (self.index, self.values, self.originals, self.patched)
        runs = self.runs.nbytes if self.runs is not None else 0
        return sum(t.nbytes for t in tensors) + dense + runs


def flatten_delta(prepared: PreparedDelta, flat: FlatWeights, base_values: BaseValues) -> FlatDelta | None:
    """Lay `prepared` (already validated against the resident weights) over `flat`.

    `base_values` reads the pristine base at sorted flat positions (whatever delta is patched in now).
    None when the sparse ops cannot be one sorted index (two ops on one tensor, or indices out of order);
    the swap manager then patches per tensor with deltas_store's own functions.
    """
    sparse = [op for op in prepared.ops if op.index is not None]
    dense = tuple(op for op in prepared.ops if op.index is None)
    targets = {op.target for op in sparse}
    if len(targets) != len(sparse) or not targets <= set(flat.offsets):
        return None
    sparse.sort(key=lambda op: flat.offsets[op.target])
    indices: list[torch.Tensor] = []
    spans: dict[str, tuple[int, int]] = {}
    start = 0
    for op in sparse:
        index = _checked_index(op.index, flat.shapes[op.target].numel())
        if index is None:
            return None
        indices.append(index.to(flat.buffer.device) + flat.offsets[op.target])
        spans[op.target] = (start, start + index.numel())
        start += index.numel()
    device, dtype = flat.buffer.device, flat.buffer.dtype
    empty = torch.empty(0, dtype=torch.int64, device=device)
    index = torch.cat(indices).long() if indices else empty
    values = torch.cat([op.values.to(device, dtype) for op in sparse]) if sparse else flat.buffer[:0].clone()
    originals = base_values(index)
    patched = originals + values  # the canonical arithmetic: one add in the weight dtype
    rest = PreparedDelta(prepared.name, prepared.manifest, dense) if dense else None
    runs = Runs.of(index)
    long_runs = runs.count and index.numel() >= RUN_MIN_MEAN * runs.count
    return FlatDelta(index, values, originals, patched, spans, rest, runs if long_runs else None)


def gather_bits(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """buffer[index] moved as raw bits (exact, and the fast integer kernel on CPU)."""
    return buffer.view(_BITS[buffer.dtype]).index_select(0, index).view(buffer.dtype)


def _checked_index(index: torch.Tensor | None, numel: int) -> torch.Tensor | None:
    """`index` if it is strictly increasing and inside a tensor of `numel` elements, else None."""
    if index is None or index.numel() == 0:
        return index
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        return None
    return index if int(index[0]) >= 0 and int(index[-1]) < numel else None


class WriteKernel(Protocol):
    """Writes `values` at the flat positions `index` of `buffer`, bit for bit (apply and restore alike);
    `runs`, when given, is the same positions as runs (a kernel may use either)."""

    @property
    def name(self) -> str: ...

    def write_(
        self, buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor, runs: Runs | None = None
    ) -> None: ...


@dataclass(frozen=True)
class ScatterBits:
    """scatter_ on the same-width integer view: exact, and no half-precision kernel on CPU."""

    name: str = "scatter"

    def write_(
        self, buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor, runs: Runs | None = None
    ) -> None:
        bits = buffer.view(_BITS[buffer.dtype])
        bits.scatter_(0, index, values.view(bits.dtype))


@dataclass(frozen=True)
class IndexCopy:
    """index_copy_ (deltas_store.patching's kernel)."""

    name: str = "index_copy"

    def write_(
        self, buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor, runs: Runs | None = None
    ) -> None:
        buffer.index_copy_(0, index, values)


@dataclass(frozen=True)
class IndexPut:
    """index_put_ (what `w[idx] = v` compiles to)."""

    name: str = "index_put"

    def write_(
        self, buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor, runs: Runs | None = None
    ) -> None:
        buffer.index_put_((index,), values)


@dataclass(frozen=True)
class NativeAssign:
    """deltas_store.native on CPU: one memcpy per run when the positions come in runs (assign_runs_), else a
    raw copy loop that prefetches the weight lines it writes (assign_); scatter_ on other devices, or where
    the native kernels are not built."""

    name: str = "native"

    def write_(
        self, buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor, runs: Runs | None = None
    ) -> None:
        kernels = native.module() if buffer.device.type == "cpu" else None
        if kernels is None or index.dtype != torch.int64:
            ScatterBits().write_(buffer, index, values)
        elif runs is not None and hasattr(kernels, "assign_runs_"):  # a prebuilt file may predate it
            kernels.assign_runs_(buffer, runs.starts, runs.offsets, values)
        else:
            kernels.assign_(buffer, index, values)


WRITE_KERNELS: dict[str, WriteKernel] = {
    k.name: k for k in (ScatterBits(), IndexCopy(), IndexPut(), NativeAssign())
}
DEFAULT_KERNEL = "native"  # fastest exact write on CPU in bench/swap.py; scatter (the fallback) elsewhere
