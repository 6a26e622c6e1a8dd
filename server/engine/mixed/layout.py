"""A delta laid out for mixed batches: CSR matrices for Linear/Embedding weights, full vectors for norms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from deltas_store import PreparedDelta
from server.engine.mixed.modules import ParamUses


@dataclass(frozen=True)
class SparseRows:
    """ΔW of one (rows, cols) weight in CSR: row r keeps columns col[crow[r]:crow[r+1]] with those values."""

    crow: torch.Tensor  # (rows + 1,) int32 offsets into col/values
    # (nnz,) column of each kept value, ascending within a row: int16 read as uint16 on CPU where cols <= 65536
    # (what the native kernel streams: 2 bytes less per kept value), else int32. `columns()` reads either.
    col: torch.Tensor
    values: torch.Tensor  # (nnz,) the delta's kept values (already scaled), in the side-compute dtype
    shape: tuple[int, int]
    # (nnz,) int16 (read as uint16) output row of each kept value, for the native kernel's scatter path
    # (no loop, so no mispredicted branch, per output row); None on GPUs and for more than 65536 rows.
    row: torch.Tensor | None = None

    @property
    def nnz(self) -> int:
        return self.col.numel()

    def columns(self) -> torch.Tensor:
        """(nnz,) int64 column indices, whatever width `col` is stored at."""
        return _unsigned(self.col)

    @property
    def nbytes(self) -> int:
        return (
            self.crow.nbytes
            + self.col.nbytes
            + self.values.nbytes
            + (0 if self.row is None else self.row.nbytes)
        )


@dataclass(frozen=True)
class MixedDelta:
    """What a mixed batch needs of one delta; built once when the delta is loaded, cached with it."""

    name: str
    matrices: Mapping[str, SparseRows]  # Linear / Embedding weight name -> its ΔW
    # norm weight name -> (positions, values): (nnz,) int64 + (nnz,) weight dtype, or (None, (H,)) to replace
    norms: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]
    linear_nnz: int  # kept values a row pays for in Linear side products (the scheduler's cost model)
    density: float  # kept values / elements of the tensors it changes

    @property
    def nbytes(self) -> int:
        norms = sum(v.nbytes + (0 if i is None else i.nbytes) for i, v in self.norms.values())
        return sum(m.nbytes for m in self.matrices.values()) + norms


def side_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype side products run in: the weights' own, except half types on CPU (no sparse kernels)."""
    half = dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and device.type == "cpu" else dtype


def build_mixed(
    prepared: PreparedDelta,
    uses: ParamUses,
    weights: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor] | None = None,
) -> MixedDelta | None:
    """Lay out `prepared` (validated) for side terms; None when it changes a parameter no side term covers.

    `values` may give each target's kept values as views of another layout (the swap path's flat buffer),
    so the two layouts share memory when the side-compute dtype is the weights' own.
    """
    matrices: dict[str, SparseRows] = {}
    norms: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    linear_nnz = kept = changed = 0
    for op in prepared.ops:
        target = op.target
        if not uses.supports(target):
            return None
        weight = weights[target]
        kept += op.values.numel() if op.index is not None else weight.numel()
        changed += weight.numel()
        if target in uses.norms:
            # Patched per batch against the base then resident (now another delta may be merged in).
            norms[target] = (None if op.index is None else op.index.long(), op.values)
            continue
        if op.index is None or weight.dim() != 2:  # a whole new matrix is no side term: merged only
            return None
        vals = op.values if values is None else values[target]
        matrices[target] = _csr(op.index, vals, (weight.shape[0], weight.shape[1]), weight.device)
        if target in uses.linears:
            linear_nnz += op.index.numel()
    density = kept / changed if changed else 0.0
    return MixedDelta(prepared.name, matrices, norms, linear_nnz, density)


_ROW_LIMIT = 1 << 16  # rows (or columns) a uint16 index can name


def _unsigned(index: torch.Tensor) -> torch.Tensor:
    """int64 of an index array, reading int16 storage as uint16."""
    wide = index.long()
    return wide & 0xFFFF if index.dtype == torch.int16 else wide


def _csr(
    index: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], device: torch.device
) -> SparseRows:
    """CSR of flat row-major positions `index` (sorted, as the delta format stores them)."""
    rows, cols = shape
    index = index.to(device=device, dtype=torch.int64)
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.bincount(index // cols, minlength=rows).cumsum(0)
    dtype = side_dtype(values.dtype, device)
    row = None
    if device.type == "cpu" and rows <= _ROW_LIMIT:
        row = (index // cols).to(torch.int16)  # wraps above 32767: the kernel reads it back as uint16
    narrow = device.type == "cpu" and cols <= _ROW_LIMIT
    col = (index % cols).to(torch.int16 if narrow else torch.int32)  # int16 wraps likewise
    return SparseRows(crow.int(), col, values.to(device, dtype), shape, row)
