"""Index encodings round-trip and reject malformed data."""

from __future__ import annotations

import pytest
import torch

from deltas_store.errors import DeltaFormatError
from deltas_store.format.encoding import check_indices, decode_varint_gaps, encode_varint_gaps


@pytest.mark.parametrize(
    "indices",
    [
        [0],
        [0, 1, 2, 3],
        [127, 128, 16_511, 16_512, 2**21 + 5, 2**28 + 7, 2**32 - 2],
        sorted(torch.randperm(10**6, generator=torch.Generator().manual_seed(0))[:5000].tolist()),
    ],
)
def test_varint_round_trip(indices: list[int]) -> None:
    idx = torch.tensor(indices, dtype=torch.int64)
    data = encode_varint_gaps(idx)
    assert data.dtype == torch.uint8
    assert torch.equal(decode_varint_gaps(data, len(indices), 2**32), idx)


def test_varint_is_compact_for_sparse_masks() -> None:
    idx = torch.arange(0, 1_000_000, 100)  # 1% density: gaps of 99 fit one byte
    assert encode_varint_gaps(idx).numel() == idx.numel()


def test_varint_rejects_truncated_and_out_of_range() -> None:
    data = encode_varint_gaps(torch.tensor([5, 300, 70_000]))
    with pytest.raises(DeltaFormatError):
        decode_varint_gaps(data[:-1], 3, 10**6)
    with pytest.raises(DeltaFormatError):
        decode_varint_gaps(data, 3, 70_000)  # last index == numel
    with pytest.raises(DeltaFormatError):
        decode_varint_gaps(data, 4, 10**6)  # count mismatch
    with pytest.raises(DeltaFormatError):
        decode_varint_gaps(torch.full((7,), 0xFF, dtype=torch.uint8), 1, 10**6)


def test_check_indices_rejects_unsorted() -> None:
    with pytest.raises(DeltaFormatError):
        check_indices(torch.tensor([3, 2]), 10)
    with pytest.raises(DeltaFormatError):
        check_indices(torch.tensor([-1, 2]), 10)
