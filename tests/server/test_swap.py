"""The swap path: flat packing, every swap kernel bit-exact against deltas_store, the naive full-copy mode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltas_store import PreparedDelta, read_delta
from deltas_store.patching import PatchOp, patched
from server.engine.model import load_model
from server.engine.packing import FlatWeights, host_clone, host_zeros, pack_parameters_
from server.metrics import ServerMetrics
from server.routing.flat import WRITE_KERNELS, Runs, flatten_delta, gather_bits
from server.routing.patching import SwapManager
from server.routing.served import serve_delta
from tests.server.conftest import BASE_ID, PROMPTS, LiveServer, seeded_store
from tests.server.test_mixed import held_batch


def flat_of(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
) -> tuple[FlatWeights, dict[str, torch.Tensor]]:
    model = torch.nn.Module()
    for i, (name, shape) in enumerate(shapes.items()):
        gen = torch.Generator().manual_seed(i)
        model.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype), False))
    flat = pack_parameters_(model, torch.device("cpu"))
    assert flat is not None
    return flat, dict(model.named_parameters())


def random_delta(weights: dict[str, torch.Tensor], density: float, seed: int) -> PreparedDelta:
    gen = torch.Generator().manual_seed(seed)
    ops = []
    for name, w in weights.items():
        index = (torch.rand(w.numel(), generator=gen) < density).nonzero().squeeze(1)
        ops.append(PatchOp(name, index, (torch.randn(index.numel(), generator=gen) * 0.01).to(w.dtype)))
    return PreparedDelta("d", None, tuple(ops))  # type: ignore[arg-type]


def block_delta(weights: dict[str, torch.Tensor], density: float, seed: int, block: int) -> PreparedDelta:
    """Like random_delta, but kept positions come in aligned runs of `block` (a --mask-block delta)."""
    from deltas_store.compression.sparsify import seeded_keep_blocks

    gen = torch.Generator().manual_seed(seed)
    ops = []
    for name, w in weights.items():
        index = seeded_keep_blocks(w.numel(), density, seed, name, block)
        ops.append(PatchOp(name, index, (torch.randn(index.numel(), generator=gen) * 0.01).to(w.dtype)))
    return PreparedDelta("d", None, tuple(ops))  # type: ignore[arg-type]


SHAPES = {"a": (64, 48), "b": (48,), "c": (32, 64)}


def test_runs_describe_the_same_positions() -> None:
    index = torch.tensor([3, 4, 5, 9, 12, 13, 20], dtype=torch.int64)
    runs = Runs.of(index)
    assert runs.starts.tolist() == [3, 9, 12, 20] and runs.offsets.tolist() == [0, 3, 4, 6, 7]
    expanded = torch.cat(
        [
            torch.arange(int(a), int(a) + int(e - b))
            for a, b, e in zip(runs.starts, runs.offsets[:-1], runs.offsets[1:], strict=True)
        ]
    )
    assert torch.equal(expanded, index)
    assert Runs.of(torch.empty(0, dtype=torch.int64)).count == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", sorted(WRITE_KERNELS))
def test_block_masked_deltas_swap_by_runs_bit_exactly(kernel: str, dtype: torch.dtype) -> None:
    flat, weights = flat_of(SHAPES, dtype)
    original = flat.buffer.clone()
    prepared = block_delta(weights, 0.3, seed=2, block=16)
    delta = flatten_delta(prepared, flat, lambda index: gather_bits(flat.buffer, index))
    assert delta is not None and delta.runs is not None
    lengths = delta.runs.offsets.diff()
    assert bool((lengths % 16 == 0).all())  # runs are whole blocks (adjacent kept blocks join one run)
    WRITE_KERNELS[kernel].write_(flat.buffer, delta.index, delta.patched, delta.runs)
    expected = original.clone()
    expected[delta.index] = original[delta.index] + delta.values
    assert torch.equal(bits(flat.buffer), bits(expected))
    WRITE_KERNELS[kernel].write_(flat.buffer, delta.index, delta.originals, delta.runs)
    assert torch.equal(bits(flat.buffer), bits(original))
    # an element mask's runs are too short to pay: no runs kept
    scattered = flatten_delta(random_delta(weights, 0.3, seed=2), flat, lambda i: gather_bits(flat.buffer, i))
    assert scattered is not None and scattered.runs is None


def test_packing_keeps_every_value_and_makes_parameters_views_of_one_buffer() -> None:
    model = torch.nn.Linear(8, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = pack_parameters_(model, torch.device("cpu"))
    assert flat is not None and flat.buffer.numel() >= 8 * 4 + 4
    assert all(offset % 16 == 0 for offset in flat.offsets.values())  # fp32: 64-byte aligned
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name])
        assert param.untyped_storage().data_ptr() == flat.buffer.untyped_storage().data_ptr()
    assert torch.equal(model(torch.ones(1, 8)), torch.ones(1, 8) @ before["weight"].T + before["bias"])


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE = 2 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_host_buffers_are_zeroed_and_huge_page_advised_where_linux_offers_them(dtype: torch.dtype) -> None:
    numel = 3 * HUGE // torch.empty(0, dtype=dtype).element_size() + 5  # not a whole number of pages
    tensor, advised = host_zeros(numel, dtype)
    assert tensor.dtype == dtype and tensor.shape == (numel,) and tensor.is_contiguous()
    assert not tensor.any()
    tensor[-1] = 1  # the tail past the last whole page is ours too
    assert advised == THP.exists()
    if advised:
        assert tensor.data_ptr() % HUGE == 0
    small, small_advised = host_zeros(1000, dtype)  # under one huge page: an ordinary tensor
    assert small.shape == (1000,) and not small.any() and not small_advised
    source = torch.randn(numel).to(dtype).view(-1, 1)
    copy = host_clone(source)
    assert copy.shape == (numel,) and torch.equal(copy, source.reshape(-1))


def test_packing_a_large_model_puts_its_buffer_on_huge_page_boundaries() -> None:
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of fp32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = pack_parameters_(model, torch.device("cpu"))
    assert flat is not None
    if THP.exists():
        assert flat.buffer.data_ptr() % HUGE == 0
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name])
        assert param.untyped_storage().data_ptr() == flat.buffer.untyped_storage().data_ptr()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", sorted(WRITE_KERNELS))
def test_every_write_kernel_applies_the_canonical_arithmetic_and_restores_bit_exactly(
    kernel: str, dtype: torch.dtype
) -> None:
    flat, weights = flat_of(SHAPES, dtype)
    prepared = random_delta(weights, 0.2, seed=1)
    original = flat.buffer.clone()
    delta = flatten_delta(prepared, flat, lambda index: gather_bits(flat.buffer, index))
    assert delta is not None
    WRITE_KERNELS[kernel].write_(flat.buffer, delta.index, delta.patched)
    for op in prepared.ops:
        assert op.index is not None
        expected = patched(
            original[flat.offsets[op.target] :][: weights[op.target].numel()], op.index, op.values
        )
        assert torch.equal(bits(weights[op.target].detach().reshape(-1)), bits(expected)), op.target
    WRITE_KERNELS[kernel].write_(flat.buffer, delta.index, delta.originals)
    assert torch.equal(bits(flat.buffer), bits(original))


def test_a_delta_loaded_while_another_is_patched_in_still_reads_the_pristine_base() -> None:
    flat, weights = flat_of(SHAPES, torch.bfloat16)
    original = flat.buffer.clone()
    swaps = SwapManager(weights, ServerMetrics(), flat)
    first = serve_delta(random_delta(weights, 0.5, seed=1), weights, flat, None, swaps.base_values)
    swaps.activate(("first", 1), first)
    second = serve_delta(
        random_delta(weights, 0.5, seed=2), weights, flat, None, swaps.base_values
    )  # overlaps
    assert second.flat is not None
    assert torch.equal(bits(second.flat.originals), bits(original[second.flat.index.long()]))
    swaps.activate(("second", 1), second)
    expected = original.clone()
    expected[second.flat.index.long()] = original[second.flat.index.long()] + second.flat.values
    assert torch.equal(bits(flat.buffer), bits(expected))
    swaps.deactivate()
    assert torch.equal(bits(flat.buffer), bits(original))


def test_overlapping_ops_fall_back_to_per_tensor_patching() -> None:
    flat, weights = flat_of(SHAPES, torch.float32)
    op = PatchOp("a", torch.tensor([3, 5]), torch.tensor([1.0, 2.0]))

    def read(index: torch.Tensor) -> torch.Tensor:
        return gather_bits(flat.buffer, index)

    assert flatten_delta(PreparedDelta("d", None, (op, op)), flat, read) is None  # type: ignore[arg-type]
    unsorted = PatchOp("a", torch.tensor([5, 3]), torch.tensor([1.0, 2.0]))
    assert flatten_delta(PreparedDelta("d", None, (unsorted,)), flat, read) is None  # type: ignore[arg-type]
    swaps = SwapManager(weights, ServerMetrics(), flat)
    twice = PreparedDelta("d", None, (op, op))  # type: ignore[arg-type]
    served = serve_delta(twice, weights, flat, None, swaps.base_values)
    assert served.flat is None and served.prepared is not None
    original = flat.buffer.clone()
    swaps.activate(("d", 1), served)
    assert weights["a"].reshape(-1)[3] == original[3] + 2.0  # applied twice, like deltas_store does
    swaps.deactivate()
    assert torch.equal(flat.buffer, original)


def test_dense_ops_are_patched_beside_the_flat_index_and_restored() -> None:
    flat, weights = flat_of(SHAPES, torch.float32)
    sparse = PatchOp("a", torch.tensor([0, 7]), torch.tensor([1.0, -1.0]))
    dense = PatchOp("b", None, torch.full((48,), 3.0))
    swaps = SwapManager(weights, ServerMetrics(), flat)
    both = PreparedDelta("d", None, (sparse, dense))  # type: ignore[arg-type]
    served = serve_delta(both, weights, flat, None, swaps.base_values)
    assert served.flat is not None and served.flat.dense is not None
    original = flat.buffer.clone()
    swaps.activate(("d", 1), served)
    assert torch.equal(weights["b"], torch.full((48,), 3.0))
    assert weights["a"].reshape(-1)[7] == original[7] - 1.0
    swaps.activate(None, None)
    assert torch.equal(flat.buffer, original)


def test_full_copy_mode_switches_whole_weight_sets_and_returns_to_the_base(
    tiny_llama_dir: Path, delta_files: dict[str, Path]
) -> None:
    loaded = load_model(tiny_llama_dir, "cpu", "float32")
    assert loaded.flat is not None
    weights = dict(loaded.model.named_parameters())
    base = loaded.flat.buffer.clone()
    swaps = SwapManager(weights, ServerMetrics(), loaded.flat, full_base=base)
    served = {}
    for name, path in delta_files.items():
        from deltas_store import prepare_delta

        prepared = prepare_delta(read_delta(path), weights)
        served[name] = serve_delta(prepared, weights, loaded.flat, None, swaps.base_values, full_base=base)
        assert served[name].full is not None
    for name in ("ft-0", "ft-1", "ft-0"):
        swaps.activate((name, 1), served[name])
        delta = served[name].flat
        assert delta is not None
        expected = base.clone()
        expected[delta.index.long()] = base[delta.index.long()] + delta.values
        assert torch.equal(loaded.flat.buffer, expected)
    swaps.deactivate()
    assert torch.equal(loaded.flat.buffer, base)


def test_naive_full_copy_server_serves_the_applied_references(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    references: dict[str, list[str]], tiny_llama_dir: Path,
) -> None:  # fmt: skip
    server = make_server(seeded_store(tmp_path / "store", delta_files), swap_mode="full", batch_mode="merged")
    jobs = [("ft-0", PROMPTS[0]), ("ft-1", PROMPTS[1]), (BASE_ID, PROMPTS[2]), ("ft-2", PROMPTS[3])]
    assert held_batch(server, jobs) == [references[m][PROMPTS.index(p)] for m, p in jobs]
    server.runtime.scheduler.call(server.runtime.swaps.deactivate).result(10)
    resident = dict(server.runtime.engine.model.named_parameters())
    for name, tensor in load_file(tiny_llama_dir / "model.safetensors").items():
        assert torch.equal(resident[name].detach(), tensor), name
