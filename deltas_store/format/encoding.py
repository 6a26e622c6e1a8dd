"""Index encodings for sparse deltas: seeded and seeded blocks (no index data), varint gaps, plain sorted int32, and the
structural encodings that store only the ids of kept whole columns or rows."""

from __future__ import annotations

from typing import Final

import torch

from deltas_store.compression.sparsify import (
    as_rows_cols,
    lines_to_flat,
    seeded_keep_blocks,
)
from deltas_store.errors import DeltaFormatError

SEEDED: Final = "seeded"
SEEDED_BLOCKS: Final = "seeded_blocks"  # whole aligned runs of `block` values, regenerated from the seed
VARINT_GAPS: Final = "varint_gaps"
INDICES_I32: Final = "indices_i32"
COLUMNS: Final = "columns"  # `P::columns`: sorted int32 ids of kept last-dim columns; every row keeps them
ROWS: Final = "rows"  # `P::rows`: sorted int32 ids of kept first-dim rows, each kept whole
LINE_ENCODINGS = (COLUMNS, ROWS)
INDEX_ENCODINGS = (SEEDED, SEEDED_BLOCKS, VARINT_GAPS, INDICES_I32, COLUMNS, ROWS)
_MAX_VARINT_BYTES = 5  # 35 bits: enough for any gap inside a tensor of < 2**32 elements


def encode_varint_gaps(indices: torch.Tensor) -> torch.Tensor:
    """LEB128 bytes of the gaps between sorted flat indices (gap - 1, so consecutive indices cost 0).

    A 1%-dense mask has gaps near 100, so most kept values cost one index byte instead of four.
    """
    idx = indices.to(torch.int64).flatten()
    if idx.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    prev = torch.cat([torch.tensor([-1], dtype=torch.int64, device=idx.device), idx[:-1]])
    gaps = idx - prev - 1  # (n,) >= 0 for strictly increasing indices
    if bool((gaps < 0).any()):
        raise ValueError("indices must be strictly increasing")
    nbytes = torch.ones_like(gaps)
    for bits in (7, 14, 21, 28):
        nbytes += (gaps >= (1 << bits)).to(torch.int64)
    owner = torch.repeat_interleave(torch.arange(idx.numel(), device=idx.device), nbytes)
    starts = torch.cumsum(nbytes, 0) - nbytes
    pos = torch.arange(owner.numel(), device=idx.device) - starts[owner]  # byte position in its number
    out = (gaps[owner] >> (7 * pos)) & 0x7F
    out |= (pos < nbytes[owner] - 1).to(torch.int64) << 7  # continuation bit on all but the last byte
    return out.to(torch.uint8).cpu()


def decode_varint_gaps(data: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    """Sorted int64 flat indices from LEB128 gap bytes; bounds-checked against count and numel."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise DeltaFormatError("varint index data must be a 1-D uint8 tensor")
    if count == 0:
        if data.numel():
            raise DeltaFormatError("varint index data present for an empty tensor")
        return torch.empty(0, dtype=torch.int64)
    b = data.to(torch.int64)
    last = b < 0x80
    if data.numel() == 0 or not bool(last[-1]):
        raise DeltaFormatError("varint index data is truncated")
    ends = torch.nonzero(last).flatten()
    if ends.numel() != count:
        raise DeltaFormatError(f"varint index data holds {ends.numel()} indices, manifest says {count}")
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1] + 1])
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        raise DeltaFormatError("varint index data has an over-long number")
    owner = torch.repeat_interleave(torch.arange(count), lengths)
    pos = torch.arange(b.numel()) - starts[owner]
    gaps = torch.zeros(count, dtype=torch.int64).scatter_add_(0, owner, (b & 0x7F) << (7 * pos))
    indices = torch.cumsum(gaps + 1, 0) - 1
    check_indices(indices, numel)
    return indices


def check_indices(indices: torch.Tensor, numel: int) -> None:
    """Raise DeltaFormatError unless indices are strictly increasing and inside [0, numel)."""
    if indices.numel() == 0:
        return
    if int(indices[0]) < 0 or int(indices[-1]) >= numel:
        raise DeltaFormatError(f"index out of range for a tensor of {numel} elements")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise DeltaFormatError("indices are not strictly increasing")


def decode_indices_i32(data: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    if data.dtype != torch.int32 or data.dim() != 1 or data.numel() != count:
        raise DeltaFormatError(f"int32 index data must be 1-D int32 with {count} entries")
    indices = data.to(torch.int64)
    check_indices(indices, numel)
    return indices


def regenerate_seeded(
    count: int, numel: int, density: float, seed: int, tensor_name: str, block: int = 1
) -> torch.Tensor:
    """The mask a seeded (block > 1: seeded_blocks) delta was pruned with; its size must match the stored
    value count."""
    indices = seeded_keep_blocks(numel, density, seed, tensor_name, block)
    if indices.numel() != count:
        kind = "block mask" if block > 1 else "mask"
        raise DeltaFormatError(
            f"{tensor_name}: the seeded {kind} keeps {indices.numel()} values, the file holds {count}"
        )
    return indices


def encode_lines(indices: torch.Tensor, shape: tuple[int, ...], axis: str) -> torch.Tensor:
    """The int32 ids of the whole columns (or rows) that sorted flat `indices` cover; ValueError otherwise."""
    _, cols = as_rows_cols(shape, axis)
    idx = indices.to(torch.int64).flatten().cpu()
    if idx.numel() == 0:
        return torch.empty(0, dtype=torch.int32)
    ids: torch.Tensor = torch.unique(idx % cols if axis == COLUMNS else idx // cols)  # sorted
    if not torch.equal(lines_to_flat(ids, shape, axis), idx):
        raise ValueError(f"indices do not cover whole {axis} of a tensor of shape {shape}")
    return ids.to(torch.int32)


def decode_lines(data: torch.Tensor, count: int, shape: tuple[int, ...], axis: str) -> torch.Tensor:
    """Sorted int64 flat indices of the kept columns (or rows); bounds- and count-checked."""
    if data.dtype != torch.int32 or data.dim() != 1:
        raise DeltaFormatError(f"{axis} ids must be a 1-D int32 tensor")
    rows, cols = as_rows_cols(shape, axis)
    lines, per_line = (cols, rows) if axis == COLUMNS else (rows, cols)
    if data.numel() * per_line != count:
        raise DeltaFormatError(f"{data.numel()} kept {axis} of {per_line} values each, manifest says {count}")
    ids = data.to(torch.int64)
    check_indices(ids, lines)
    return lines_to_flat(ids, shape, axis)
