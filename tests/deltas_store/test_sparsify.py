"""Masks: seeded, portable, binomially sized; top-k keeps the largest."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from deltas_store import native
from deltas_store.compression.sparsify import (
    _mix32,
    _mix32_,
    _seeded_keep_torch,
    keep_threshold,
    rowwise_topk_keep_indices,
    seeded_keep_blocks,
    seeded_keep_indices,
    stream_key,
    topk_keep_indices,
)


def test_same_seed_same_mask_and_different_seed_or_name_differs() -> None:
    a = seeded_keep_indices(50_000, 0.1, seed=3, tensor_name="w")
    assert torch.equal(a, seeded_keep_indices(50_000, 0.1, seed=3, tensor_name="w"))
    assert not torch.equal(a, seeded_keep_indices(50_000, 0.1, seed=4, tensor_name="w"))
    assert not torch.equal(a, seeded_keep_indices(50_000, 0.1, seed=3, tensor_name="v"))


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01, 0.001])
def test_kept_count_within_binomial_bounds(density: float) -> None:
    n = 1_000_000
    kept = seeded_keep_indices(n, density, seed=11, tensor_name="layer.weight").numel()
    mean, std = n * density, math.sqrt(n * density * (1 - density))
    assert abs(kept - mean) < 5 * std


def test_mask_is_spatially_uniform() -> None:
    # The kept fraction in each tenth of the tensor matches the density (no counter-correlated bias).
    n, density = 1_000_000, 0.05
    idx = seeded_keep_indices(n, density, seed=1, tensor_name="x")
    counts = torch.bincount(idx // (n // 10), minlength=10).float()
    std = math.sqrt(n / 10 * density * (1 - density))
    assert (counts - n / 10 * density).abs().max() < 5 * std


def test_indices_sorted_unique_in_range() -> None:
    idx = seeded_keep_indices(123_457, 0.3, seed=0, tensor_name="t")
    assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < 123_457


def test_density_one_keeps_all() -> None:
    assert torch.equal(seeded_keep_indices(1000, 1.0, 5, "t"), torch.arange(1000))


def test_mask_identical_in_another_process() -> None:
    code = (
        "from deltas_store.compression.sparsify import seeded_keep_indices as f;"
        "print(f(200000, 0.01, 42, 'model.layers.0.mlp.up_proj.weight').tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = seeded_keep_indices(200_000, 0.01, 42, "model.layers.0.mlp.up_proj.weight").tolist()
    assert out.strip() == str(here)


@pytest.mark.parametrize(
    ("numel", "density", "seed", "name"),
    [
        (0, 0.5, 1, "empty"),
        (1, 1.0, 2, "one"),
        (65_537, 0.01, 3, "a block and one"),
        (1_000_003, 0.3, 2**40 + 7, "model.layers.3.mlp.down_proj.weight"),
        (300_000, 1e-5, 0, "sparse"),
    ],
)
def test_native_mask_is_the_torch_mask_bit_for_bit(numel: int, density: float, seed: int, name: str) -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here to build the native kernels")
    kernels = native.build()
    key_a, key_b = stream_key(seed, name)
    threshold = keep_threshold(density)
    fast = kernels.seeded_keep(numel, key_a, key_b, threshold)
    assert fast.dtype == torch.int64
    assert torch.equal(fast, _seeded_keep_torch(numel, key_a, key_b, threshold, "cpu"))


def test_scalar_hash_is_the_tensor_hash() -> None:
    """stream_key hashes Python ints; masks hash tensors (and C++): the same function, bit for bit."""
    values = [
        0,
        1,
        0x9E3779B9,
        2**31,
        2**32 - 1,
        *torch.randint(0, 2**32, (200,), dtype=torch.int64).tolist(),
    ]
    tensor = _mix32_(torch.tensor(values, dtype=torch.int64))
    assert [_mix32(v) for v in values] == tensor.tolist()
    assert _mix32(2**32 + 5) == _mix32(5)  # the value is taken mod 2**32


@pytest.mark.gpu
def test_mask_identical_on_cuda() -> None:
    cpu = seeded_keep_indices(3_000_000, 0.01, 9, "w")
    cuda = seeded_keep_indices(3_000_000, 0.01, 9, "w", device="cuda")
    assert torch.equal(cpu, cuda.cpu())


@pytest.mark.parametrize(("numel", "block"), [(64 * 48, 16), (1000, 16), (999, 7), (5, 16)])
def test_block_mask_keeps_whole_aligned_runs(numel: int, block: int) -> None:
    density = 0.25
    idx = seeded_keep_blocks(numel, density, 3, "w", block)
    assert torch.equal(idx, seeded_keep_blocks(numel, density, 3, "w", block))
    assert bool((idx[1:] > idx[:-1]).all()) and (idx.numel() == 0 or 0 <= int(idx[0]) <= int(idx[-1]) < numel)
    blocks = torch.unique(idx // block)
    # every kept block is kept whole (the last one only up to numel), and nothing else is kept
    whole = (blocks.unsqueeze(1) * block + torch.arange(block)).flatten()
    assert torch.equal(idx, whole[whole < numel])
    n_blocks = -(-numel // block)
    if n_blocks >= 100:
        sigma = math.sqrt(n_blocks * density * (1 - density))
        assert abs(blocks.numel() - density * n_blocks) < 5 * sigma
        assert not torch.equal(idx, seeded_keep_blocks(numel, density, 4, "w", block))
    # density 1 keeps every block, the partial last one up to numel
    assert torch.equal(seeded_keep_blocks(numel, 1.0, 3, "w", block), torch.arange(numel))


def test_block_of_one_is_the_element_mask() -> None:
    assert torch.equal(seeded_keep_blocks(5000, 0.1, 0, "w", 1), seeded_keep_indices(5000, 0.1, 0, "w"))
    with pytest.raises(ValueError, match="block"):
        seeded_keep_blocks(10, 0.5, 0, "w", 0)


def test_topk_keeps_largest() -> None:
    scores = torch.tensor([[0.1, 5.0, 0.2], [3.0, 0.0, 4.0]])
    assert topk_keep_indices(scores, 0.5).tolist() == [1, 3, 5]
    assert rowwise_topk_keep_indices(scores, 2 / 3).tolist() == [1, 2, 3, 5]
