"""Structural DPP: whole columns (or rows) dropped, 1/q rescale, stored as kept ids only (golden layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltas_store.apply import apply_to_dir
from deltas_store.compression.pipeline import CompressOptions, compress
from deltas_store.compression.sparsify import as_rows_cols, seeded_keep_lines, structural_keep_indices
from deltas_store.errors import DeltaFormatError
from deltas_store.format.encoding import decode_lines, encode_lines
from deltas_store.format.io import read_delta


@pytest.mark.parametrize(("axis", "method"), [("columns", "structural"), ("rows", "structural-rows")])
def test_structural_golden_layout_and_exact_apply(
    axis: str, method: str, tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    ft, p, q, seed = tiny_llama_finetunes["ft-1"], 0.75, 0.5, 4
    r = compress(
        CompressOptions(
            tiny_llama_dir, ft, tmp_path / "s.safetensors", method=method, drop_rate=p, q=q, seed=seed
        )
    )
    # Golden layout: `P::values` in the fine-tune's dtype plus `P::columns` / `P::rows`, sorted int32 ids.
    data = r.path.read_bytes()
    head = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    manifest = json.loads(head.pop("__metadata__")["deltaserve.manifest"])
    assert manifest["method"] == method and manifest["q"] == q
    base, tuned = load_file(tiny_llama_dir / "model.safetensors"), load_file(ft / "model.safetensors")
    for name, entry in manifest["params"].items():
        assert entry["encoding"] == axis and entry["density"] is None and entry["scale"] == 1 / q
        assert set(k for k in head if k.startswith(f"{name}::")) == {f"{name}::values", f"{name}::{axis}"}
        assert head[f"{name}::{axis}"]["dtype"] == "I32" and head[f"{name}::values"]["dtype"] == "F32"
        shape = tuple(entry["shape"])
        rows, cols = as_rows_cols(shape, axis)
        ids = seeded_keep_lines(cols if axis == "columns" else rows, 1 - p, seed, name)
        assert head[f"{name}::{axis}"]["shape"] == [ids.numel()]
        assert entry["nnz"] == ids.numel() * (rows if axis == "columns" else cols)
    applied = load_file(apply_to_dir(tiny_llama_dir, r.path, tmp_path / "out") / "model.safetensors")
    for name, w in applied.items():
        idx = structural_keep_indices(tuple(w.shape), 1 - p, seed, name, axis)
        delta = (tuned[name].float() - base[name].float()).reshape(-1)
        want = base[name].clone().reshape(-1)
        want[idx] = want[idx] + (delta[idx] * (1 / q)).to(want.dtype)
        assert torch.equal(w.reshape(-1), want), name
        if w.dim() == 2 and axis == "columns":  # whole columns: a dropped column changes in no row
            changed = (w != base[name]).any(dim=0)
            kept_cols = torch.zeros(w.shape[1], dtype=torch.bool)
            kept_cols[seeded_keep_lines(w.shape[1], 1 - p, seed, name)] = True
            assert not bool((changed & ~kept_cols).any())


def test_structural_q_is_searched_by_default(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    r = compress(
        CompressOptions(
            tiny_llama_dir,
            tiny_llama_finetunes["ft-0"],
            tmp_path / "s.safetensors",
            method="structural",
            drop_rate=0.5,
            calibration_samples=2,
            calibration_tokens=16,
        )
    )
    assert r.manifest.calibration is not None and len(r.manifest.calibration.grid) >= 5
    assert 0.5 <= r.manifest.q <= 1.0  # type: ignore[operator]
    assert read_delta(r.path).sparse


def test_line_encoding_round_trip_and_rejects_bad_ids() -> None:
    shape = (4, 10)
    idx = structural_keep_indices(shape, 0.5, 0, "w", "columns")
    ids = encode_lines(idx, shape, "columns")
    assert torch.equal(decode_lines(ids, idx.numel(), shape, "columns"), idx)
    with pytest.raises(ValueError):
        encode_lines(torch.tensor([0, 1]), shape, "columns")  # not whole columns
    with pytest.raises(DeltaFormatError):
        decode_lines(torch.tensor([3, 10], dtype=torch.int32), 8, shape, "columns")  # column 10 of 10
    with pytest.raises(DeltaFormatError):
        decode_lines(torch.tensor([3, 2], dtype=torch.int32), 8, shape, "columns")  # unsorted
    with pytest.raises(DeltaFormatError):
        decode_lines(torch.tensor([1, 2], dtype=torch.int32), 9, shape, "columns")  # count mismatch
    with pytest.raises(DeltaFormatError):
        decode_lines(torch.tensor([1, 2], dtype=torch.int64), 8, shape, "columns")  # wrong dtype
    rows = structural_keep_indices(shape, 0.5, 1, "w", "rows")
    assert torch.equal(decode_lines(encode_lines(rows, shape, "rows"), rows.numel(), shape, "rows"), rows)


def test_one_dimensional_tensors_drop_elementwise() -> None:
    assert as_rows_cols((7,), "columns") == (1, 7) and as_rows_cols((7,), "rows") == (7, 1)
    assert as_rows_cols((2, 3, 5), "columns") == (6, 5) and as_rows_cols((2, 3, 5), "rows") == (2, 15)
