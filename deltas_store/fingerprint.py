"""A base model's fingerprint: names, shapes, dtypes and sampled values, hashed.

Two bases with identical shapes but different weights (another seed, another checkpoint) get different
fingerprints, so a delta cannot be applied to the wrong one. Only a few rows per tensor are read.
"""

from __future__ import annotations

import hashlib

import torch

from deltas_store.checkpoint import ModelDir

_ROWS_PER_TENSOR = 4
_VALUES_PER_ROW = 64


def _raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def base_fingerprint(model: ModelDir) -> str:
    """sha256 over every tensor's name, dtype, shape and a few sampled rows (first values of each)."""
    h = hashlib.sha256()
    for name in model.names():
        info = model.info(name)
        h.update(f"{name}|{info.dtype}|{info.shape}|".encode())
        if not info.shape:
            h.update(_raw_bytes(model.get_tensor(name)))
            continue
        last = info.shape[0] - 1
        rows = (
            sorted({(i * last) // (_ROWS_PER_TENSOR - 1) for i in range(_ROWS_PER_TENSOR)})
            if last >= 0
            else []
        )
        for row in rows:
            h.update(_raw_bytes(model.get_rows(name, row, row + 1).reshape(-1)[:_VALUES_PER_ROW]))
    return "sha256:" + h.hexdigest()
