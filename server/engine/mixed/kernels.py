"""Side products of a mixed batch: one grouped sparse matmul per Linear, one exact row gather per embedding.

Rows are grouped by delta into chunks of `width` rows; chunk k's delta sits on the k-th diagonal block of
one CSR matrix, so one `torch.sparse.mm` computes every row's x·ΔWᵀ with no loop over deltas. A delta with
more rows than `width` gets several chunks (its values repeated); a chunk with fewer rows has padding
columns whose products are computed and ignored. The width trades index loads (one per kept value per
chunk) against padding; bench/mixed.py compares this with per-delta loops, padded `bmm` and gathers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.mixed.layout import SparseRows

# Cost of one chunk: nnz * (_INDEX_COST + width) multiply-adds, i.e. a kept value's index and value load
# costs about as much as 8 multiply-adds over contiguous columns (torch.sparse.mm on CPU; bench/mixed.py).
_INDEX_COST = 8.0
_WIDTHS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Chunking:
    """Where each row's columns go: chunk k (delta `chunks[k]`) owns column slots k*width .. k*width+width-1."""

    width: int
    chunks: tuple[int, ...]  # (K,) delta slot of each chunk
    row_slot: tuple[int, ...]  # (B,) per batch row: its column slot, or -1 for a row of the base model


def plan_chunks(row_delta: Sequence[int], nnz: Sequence[int]) -> Chunking:
    """Pick the chunk width with the least estimated work for rows `row_delta` (delta slot or -1 per row).

    `nnz[s]` is the kept values delta s multiplies per row. Width 1 repeats a delta once per row (no
    padding, no reuse); a wide chunk loads each kept value once for many rows but pads small groups.
    """
    counts = [0] * len(nnz)
    for slot in row_delta:
        if slot >= 0:
            counts[slot] += 1
    most = max(counts, default=1) or 1
    widths = sorted({w for w in _WIDTHS if w < most} | {most})

    def cost(width: int) -> float:
        return sum(math.ceil(n / width) * z * (_INDEX_COST + width) for n, z in zip(counts, nnz, strict=True))

    width = min(widths, key=cost)
    first: list[int] = []
    chunks: list[int] = []
    for slot, n in enumerate(counts):
        first.append(len(chunks))
        chunks.extend([slot] * math.ceil(n / width))
    used = [0] * len(nnz)
    row_slot: list[int] = []
    for slot in row_delta:
        if slot < 0:
            row_slot.append(-1)
            continue
        j = used[slot]
        used[slot] += 1
        row_slot.append((first[slot] + j // width) * width + j % width)
    return Chunking(width, tuple(chunks), tuple(row_slot))


def block_diagonal(blocks: Sequence[SparseRows | None], shape: tuple[int, int]) -> torch.Tensor | None:
    """(K*rows, K*cols) sparse CSR with blocks[k] on the k-th diagonal block; None when all are empty."""
    present = [b for b in blocks if b is not None and b.nnz]
    if not present:
        return None
    rows, cols = shape
    ref = present[0]
    empty_crow = torch.zeros(rows + 1, dtype=ref.crow.dtype, device=ref.crow.device)
    crows: list[torch.Tensor] = []
    col_parts: list[torch.Tensor] = []
    value_parts: list[torch.Tensor] = []
    offset = 0
    for k, block in enumerate(blocks):
        crow = empty_crow if block is None else block.crow
        crows.append(crow[:-1] + offset)
        if block is not None and block.nnz:
            col_parts.append((block.columns() + k * cols).to(ref.crow.dtype))
            value_parts.append(block.values)
            offset += block.nnz
    crows.append(empty_crow[-1:] + offset)
    size = (len(blocks) * rows, len(blocks) * cols)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely only on its matmul
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.cat(crows), torch.cat(col_parts), torch.cat(value_parts), size, check_invariants=False
        )


def grouped_side(
    matrix: torch.Tensor, x: torch.Tensor, width: int, slot_row: torch.Tensor, chunk: torch.Tensor,
    column: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """(A, T, out) products x[row] · ΔWᵀ of the A active rows, ΔW being their chunk's diagonal block.

    `matrix` is `block_diagonal(...)` (K*out, K*in); `x` (B, T, in); `slot_row` (K*width,) the row feeding
    each column slot (padding slots repeat any row: their products are never read); `chunk`, `column` (A,)
    where each active row's products land.
    """
    k_out, k_in = matrix.shape
    _, t, n_in = x.shape
    k = k_in // n_in
    xs = x.index_select(0, slot_row).to(matrix.dtype)  # (K*width, T, in)
    if width * t == 1:
        xc = xs.view(k * n_in, 1)  # decode with one row per chunk: already (K*in, 1)
    else:
        xc = xs.view(k, width * t, n_in).transpose(1, 2).reshape(k * n_in, width * t)  # (K*in, width*T)
    y: torch.Tensor = torch.sparse.mm(matrix, xc)  # (K*out, width*T)
    y4 = y.view(k, k_out // k, width, t).permute(0, 2, 3, 1)  # (K, width, T, out), a view
    return y4[chunk, column]  # (A, T, out)


@dataclass(frozen=True)
class StackedRows:
    """Several deltas' ΔE of one (V, H) embedding as one CSR of (D*V, H): delta s owns rows s*V .. s*V+V-1."""

    crow: torch.Tensor  # (D*V + 1,) int64
    col: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,)
    vocab: int
    width: int


def stack_rows(blocks: Sequence[SparseRows | None], shape: tuple[int, int]) -> StackedRows | None:
    """Stack per-delta CSRs (None = the delta leaves this embedding alone); None when all are empty."""
    present = [b for b in blocks if b is not None and b.nnz]
    if not present:
        return None
    vocab, width = shape
    device = present[0].crow.device
    crows: list[torch.Tensor] = []
    offset = 0
    for block in blocks:
        crow = (
            torch.zeros(vocab + 1, dtype=torch.int64, device=device) if block is None else block.crow.long()
        )
        crows.append(crow[:-1] + offset)
        offset += 0 if block is None else block.nnz
    crows.append(torch.tensor([offset], device=device))
    col = torch.cat([b.columns() for b in present])
    values = torch.cat([b.values for b in present])
    return StackedRows(torch.cat(crows), col, values, vocab, width)


def embedding_side_(
    out: torch.Tensor, ids: torch.Tensor, stacked: StackedRows, row_delta: torch.Tensor
) -> None:
    """Add each token's ΔE row to `out` (B, T, H) in place, for rows with a delta (`row_delta` (B,), -1 = none).

    One add per changed element, in `out`'s dtype: exactly the value of the patched embedding's row.
    """
    b, t = ids.shape
    has = (row_delta >= 0).repeat_interleave(t)  # (B*T,)
    token = torch.arange(b * t, device=ids.device)[has]  # flat (row, position) of tokens with a delta
    row = row_delta.repeat_interleave(t)[has] * stacked.vocab + ids.reshape(-1)[has]  # rows of the stack
    start = stacked.crow[row]
    count = stacked.crow[row + 1] - start
    total = int(count.sum())
    if total == 0:
        return
    # entry e of token i: stack position start[i] + (e - first entry of token i)
    first = torch.repeat_interleave(count.cumsum(0) - count, count)
    entry = torch.arange(total, device=ids.device) - first + torch.repeat_interleave(start, count)
    dest = torch.repeat_interleave(token, count) * stacked.width + stacked.col[entry]
    out.view(-1).index_add_(0, dest, stacked.values[entry].to(out.dtype))
