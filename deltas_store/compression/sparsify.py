"""Pure tensor functions that choose which delta entries to keep: seeded random masks and top-k."""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so a 32-bit value times one stays below 2**63: int64 never overflows and the
# arithmetic is exact and identical on every device (CPU, CUDA), torch version and platform.
_MUL_A = 0x7FEB352D
_MUL_B = 0x5BD1E995
_CHUNK = 1 << 18  # 2 MiB of int64 per pass: the hash passes stay in cache (5x faster than 4M here)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply), in place on an int64 tensor of values in [0, 2**32)."""
    x ^= x >> 16
    x *= _MUL_A
    x &= _MASK32
    x ^= x >> 15
    x *= _MUL_B
    x &= _MASK32
    x ^= x >> 16
    return x


def _mix32(value: int) -> int:
    """`_mix32_` of one value, in Python integers (a stream key costs four: no tensor per call)."""
    x = value & _MASK32
    x ^= x >> 16
    x = (x * _MUL_A) & _MASK32
    x ^= x >> 15
    x = (x * _MUL_B) & _MASK32
    x ^= x >> 16
    return x


def stream_key(seed: int, tensor_name: str) -> tuple[int, int]:
    """Two 32-bit keys that select an independent mask stream per (seed, tensor name)."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    name_key = int.from_bytes(hashlib.sha256(tensor_name.encode()).digest()[:4], "little")
    seed_key = _mix32((seed & _MASK32) ^ _mix32(seed >> 32))
    return _mix32(seed_key ^ name_key), _mix32(seed_key + 0x9E3779B9)


def keep_threshold(density: float) -> int:
    """Element i is kept iff its 32-bit hash is below this; density 1 keeps everything."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(int(density * 2**32), 2**32)


def seeded_keep_indices(
    numel: int, density: float, seed: int, tensor_name: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Sorted int64 flat indices kept by a portable counter-based Bernoulli(density) mask.

    The same (numel, density, seed, tensor_name) gives the same indices on any device, so a delta that
    stores only its values can regenerate its mask anywhere. Example::

        idx = seeded_keep_indices(4096, 0.01, seed=0, tensor_name="model.layers.0.mlp.up_proj.weight")
    """
    if numel >= 2**32:
        raise ValueError("seeded masks support tensors of fewer than 2**32 elements")
    key_a, key_b = stream_key(seed, tensor_name)
    threshold = keep_threshold(density)
    if torch.device(device).type == "cpu":
        from deltas_store import native

        kernels = native.module()
        if kernels is not None:  # the same hash in C++ on every core (about 10x faster)
            return kernels.seeded_keep(numel, key_a, key_b, threshold)
    return _seeded_keep_torch(numel, key_a, key_b, threshold, device)


def seeded_keep_blocks(
    numel: int, density: float, seed: int, tensor_name: str, block: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Sorted int64 flat indices of a seeded mask that keeps aligned runs of `block` elements whole.

    Block b covers flat indices [b·block, (b+1)·block) (the last one may be shorter); each block is kept
    with probability density by the same portable hash, over a stream of its own per block size. In a
    row-major weight a block is `block` adjacent entries of one row (whenever the row length is a multiple
    of it), so applying the delta touches whole cache lines (16 fp32 values are one 64-byte line) instead of
    a scattered 1% of values that dirties about 15% of the lines.
    """
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    if block == 1:
        return seeded_keep_indices(numel, density, seed, tensor_name, device)
    blocks = -(-numel // block)
    ids = seeded_keep_indices(blocks, density, seed, f"{tensor_name}#blocks{block}", device)
    flat = (ids.unsqueeze(1) * block + torch.arange(block, device=ids.device)).flatten()
    if ids.numel() and int(ids[-1]) == blocks - 1 and numel % block:
        flat = flat[flat < numel]  # the last block is partial
    return flat


def _seeded_keep_torch(
    numel: int, key_a: int, key_b: int, threshold: int, device: torch.device | str
) -> torch.Tensor:
    """`seeded_keep_indices` in torch ops (any device), chunk by chunk."""
    parts = []
    for start in range(0, numel, _CHUNK):
        counter = torch.arange(start, min(start + _CHUNK, numel), dtype=torch.int64, device=device)
        h = _mix32_(counter ^ key_a)
        h ^= key_b
        h = _mix32_(h)
        parts.append(torch.nonzero(h < threshold).flatten() + start)
    if not parts:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(parts)


def topk_keep_indices(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat indices of the round(density * n) largest scores of a tensor (magnitude pruning)."""
    flat = scores.flatten()
    k = round(density * flat.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    kept = torch.topk(flat, k, sorted=False).indices
    return torch.sort(kept).values


def rowwise_topk_keep_indices(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat indices of the top round(density * cols) scores in every row of a 2-D tensor."""
    if scores.dim() != 2:
        return topk_keep_indices(scores, density)
    rows, cols = scores.shape
    k = round(density * cols)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    cols_kept = torch.topk(scores, k, dim=1, sorted=False).indices  # (rows, k)
    flat = cols_kept + torch.arange(rows, device=scores.device).unsqueeze(1) * cols
    return torch.sort(flat.flatten()).values


def wanda_keep_indices(delta: torch.Tensor, input_norm: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat indices of the top density fraction per output row of |delta_ij| * ||X_j||_2 (WANDA).

    delta is a Linear weight's delta (out, in); input_norm (in,) is the L2 norm of each input feature over
    the calibration tokens.
    """
    if delta.dim() != 2 or input_norm.shape != (delta.shape[1],):
        raise ValueError(f"wanda needs a 2-D delta and one norm per column, got {tuple(delta.shape)}")
    scores = delta.abs() * input_norm.to(delta.device, delta.dtype).unsqueeze(0)  # (out, in)
    return rowwise_topk_keep_indices(scores, density)


def as_rows_cols(shape: tuple[int, ...], axis: str) -> tuple[int, int]:
    """A tensor seen as a (rows, cols) matrix whose lines along `axis` are dropped whole.

    axis "columns": (product of all but the last dim, last dim); axis "rows": (first dim, product of the
    rest). A 1-D tensor is one row of columns, or a column of rows: either way its elements drop one by one.
    """
    if axis not in ("columns", "rows"):
        raise ValueError(f"axis must be 'columns' or 'rows', got {axis!r}")
    numel = 1
    for d in shape:
        numel *= d
    if axis == "columns":
        cols = shape[-1] if shape else 1
        return (numel // cols if cols else 0), cols
    rows = shape[0] if shape else 1
    return rows, (numel // rows if rows else 0)


def seeded_keep_lines(count: int, density: float, seed: int, tensor_name: str) -> torch.Tensor:
    """Sorted ids of the whole columns (or rows) kept by a seeded Bernoulli(density) mask over `count` lines."""
    return seeded_keep_indices(count, density, seed, f"{tensor_name}#lines")


def lines_to_flat(ids: torch.Tensor, shape: tuple[int, ...], axis: str) -> torch.Tensor:
    """Sorted flat indices of every element in the kept columns (axis "columns") or rows (axis "rows")."""
    rows, cols = as_rows_cols(shape, axis)
    ids = ids.to(torch.int64)
    if axis == "columns":
        row_starts = torch.arange(rows, dtype=torch.int64, device=ids.device).unsqueeze(1) * cols
        return (row_starts + ids.unsqueeze(0)).flatten()  # (rows * kept,), row-major = sorted
    col_offsets = torch.arange(cols, dtype=torch.int64, device=ids.device).unsqueeze(0)
    return (ids.unsqueeze(1) * cols + col_offsets).flatten()


def structural_keep_indices(
    shape: tuple[int, ...], density: float, seed: int, tensor_name: str, axis: str
) -> torch.Tensor:
    """Sorted flat indices of a structural mask that keeps whole columns (or rows) with probability density."""
    rows, cols = as_rows_cols(shape, axis)
    ids = seeded_keep_lines(cols if axis == "columns" else rows, density, seed, tensor_name)
    return lines_to_flat(ids, shape, axis)
