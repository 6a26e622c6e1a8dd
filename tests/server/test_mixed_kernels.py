"""Mixed-batch building blocks on small random tensors: chunk plans, grouped sparse matmul, exact gathers, policy."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deltas_store import PreparedDelta, native
from deltas_store.patching import PatchOp, patched
from server.engine.mixed.kernels import (
    block_diagonal,
    embedding_side_,
    grouped_side,
    plan_chunks,
    stack_rows,
)
from server.engine.mixed.layout import SparseRows, _csr, build_mixed
from server.engine.mixed.modules import find_param_uses
from server.engine.request import GenerationRequest
from server.routing.policy import BatchPolicy


def sparse_rows(shape: tuple[int, int], density: float, seed: int) -> tuple[SparseRows, torch.Tensor]:
    """A random ΔW as SparseRows and as a dense (rows, cols) tensor."""
    gen = torch.Generator().manual_seed(seed)
    index = (torch.rand(shape[0] * shape[1], generator=gen) < density).nonzero().squeeze(1)
    values = torch.randn(index.numel(), generator=gen)
    dense = torch.zeros(shape[0] * shape[1])
    dense[index] = values
    return _csr(index, values, shape, torch.device("cpu")), dense.view(shape)


@pytest.mark.parametrize(
    ("row_delta", "expected_width"),
    [([0, 1, 2, 3], 1), ([0, 0, 0, 0, 0, 0, 0, 0], 8), ([0, -1, 0, 1, 1, -1], 2)],
)
def test_chunk_plan_gives_every_row_its_own_column_of_its_deltas_chunk(
    row_delta: list[int], expected_width: int
) -> None:
    plan = plan_chunks(row_delta, [100] * (max(row_delta) + 1))
    assert plan.width == expected_width
    used = [s for s in plan.row_slot if s >= 0]
    assert len(set(used)) == len(used)  # no two rows share a column
    for delta, slot in zip(row_delta, plan.row_slot, strict=True):
        assert (slot < 0) == (delta < 0)
        if delta >= 0:
            assert plan.chunks[slot // plan.width] == delta


@pytest.mark.parametrize("row_delta", [[0, 1, 2, 0, -1, 1], [1, 1, 1, 1, 0], [0], [-1, 2, 2]])
@pytest.mark.parametrize("tokens", [1, 3])
def test_grouped_side_product_equals_each_rows_dense_delta_product(row_delta: list[int], tokens: int) -> None:
    shape = (12, 10)
    deltas = [sparse_rows(shape, 0.3, seed) for seed in range(3)]
    plan = plan_chunks(row_delta, [d[0].nnz for d in deltas])
    matrix = block_diagonal([deltas[d][0] for d in plan.chunks], shape)
    x = torch.randn(len(row_delta), tokens, shape[1], generator=torch.Generator().manual_seed(9))
    rows = torch.tensor([i for i, d in enumerate(row_delta) if d >= 0])
    slot_row = [0] * (len(plan.chunks) * plan.width)
    for row, slot in enumerate(plan.row_slot):
        if slot >= 0:
            slot_row[slot] = row
    slots = torch.tensor([s for s in plan.row_slot if s >= 0])
    assert matrix is not None
    side = grouped_side(
        matrix, x, plan.width, torch.tensor(slot_row), slots // plan.width, slots % plan.width
    )
    for a, row in enumerate(rows.tolist()):
        expected = x[row] @ deltas[row_delta[row]][1].T
        torch.testing.assert_close(side[a], expected, rtol=1e-5, atol=1e-5)


def native_or_skip() -> native.NativeKernels:
    if shutil.which(os.environ.get("CXX", "c++")) is None:  # the server then uses the torch-ops path
        pytest.skip("no C++ compiler here to build the native kernels")
    return native.build()  # where a compiler exists, the build must work


SlotLists = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def slot_lists(
    deltas: list[tuple[SparseRows, torch.Tensor]], slots: list[int], scatter: bool = True
) -> SlotLists:
    """The slots' CSR arrays as pack_slots takes them; `scatter=False` withholds the row indices."""
    no_rows = torch.empty(0, dtype=torch.int16)
    return (
        [deltas[s][0].crow for s in slots],
        [deltas[s][0].col for s in slots],
        [deltas[s][0].values for s in slots],
        [deltas[s][0].row if scatter and deltas[s][0].row is not None else no_rows for s in slots],
    )


def native_args(
    kernel: native.NativeKernels,
    deltas: list[tuple[SparseRows, torch.Tensor]],
    row_delta: list[int],
    scatter: bool = True,
) -> tuple[native.SlotTable, torch.Tensor, torch.Tensor]:
    """(packed slots, slot_ptr, slot_rows) for rows `row_delta`; `scatter=False`: every slot takes the CSR path."""
    slots = sorted({d for d in row_delta if d >= 0})
    rows = [b for s in slots for b, d in enumerate(row_delta) if d == s]
    ptr = [0]
    for s in slots:
        ptr.append(ptr[-1] + row_delta.count(s))
    out_features = deltas[0][0].shape[0]
    table = native.SlotTable(kernel, *slot_lists(deltas, slots, scatter), [out_features] * len(slots))
    return table, torch.tensor(ptr), torch.tensor(rows, dtype=torch.long)


def side_linear(
    kernel: native.NativeKernels,
    out: torch.Tensor,
    x: torch.Tensor,
    args: tuple[native.SlotTable, torch.Tensor, torch.Tensor],
) -> None:
    table, ptr, rows = args
    kernel.side_linear_(out, x, table.table, ptr, rows)


@pytest.mark.parametrize(
    "row_delta", [[0, 1, 2, 0, -1, 1], [1, 1, 1, 1, 0], [0], [-1, 2, 2], [2, 2, 2, 2, 2, 2, 2]]
)
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("scatter", [True, False], ids=["scatter-narrow", "csr-only"])
def test_native_side_kernel_adds_each_rows_dense_delta_product_in_place(
    row_delta: list[int], tokens: int, scatter: bool
) -> None:
    kernel = native_or_skip()
    shape = (37, 23)  # output rows span several of the kernel's blocks; widths 1..7 cover every code path
    deltas = [sparse_rows(shape, 0.3, seed) for seed in range(3)]
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(len(row_delta), tokens, shape[1], generator=gen)
    out = torch.randn(len(row_delta), tokens, shape[0], generator=gen)
    before = out.clone()
    side_linear(kernel, out, x, native_args(kernel, deltas, row_delta, scatter))
    for row, d in enumerate(row_delta):
        expected = before[row] + (x[row] @ deltas[d][1].T if d >= 0 else 0)
        if d < 0:
            assert torch.equal(out[row], before[row])  # a base row is left exactly as it was
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_native_side_kernel_accumulates_in_float32_for_every_activation_dtype(dtype: torch.dtype) -> None:
    kernel = native_or_skip()
    shape = (16, 24)
    deltas = [sparse_rows(shape, 0.2, seed) for seed in range(2)]
    row_delta = [0, 1, 1, -1]
    x = torch.randn(4, 2, shape[1], generator=torch.Generator().manual_seed(3)).to(dtype)
    out = torch.zeros(4, 2, shape[0], dtype=dtype)
    side_linear(kernel, out, x, native_args(kernel, deltas, row_delta))
    for row, d in enumerate(row_delta):
        expected = x[row].float() @ deltas[d][1].T if d >= 0 else torch.zeros(2, shape[0])
        torch.testing.assert_close(out[row].float(), expected, rtol=1e-2, atol=1e-2)


def test_native_scatter_path_reaches_output_rows_past_int16() -> None:
    """Row indices are stored as int16 and read back as uint16: rows 32768..65535 (a vocabulary-sized
    lm_head) must land where they belong, not wrap to negative offsets."""
    kernel = native_or_skip()
    shape = (40_000, 4)
    deltas = [sparse_rows(shape, 0.002, 5)]
    assert deltas[0][0].row is not None and int(deltas[0][0].row.min()) < 0  # some rows did wrap in int16
    x = torch.randn(2, 1, shape[1], generator=torch.Generator().manual_seed(1))
    out = torch.zeros(2, 1, shape[0])
    side_linear(kernel, out, x, native_args(kernel, deltas, [0, 0]))
    torch.testing.assert_close(out[:, 0], x[:, 0] @ deltas[0][1].T, rtol=1e-5, atol=1e-5)


def test_columns_past_int16_reach_their_inputs_on_both_paths() -> None:
    """Column indices are stored as int16 on CPU and read back as uint16: inputs 32768..65535 (a wide
    down-projection) must be the ones multiplied, by the native kernel and by the torch-ops path."""
    shape = (3, 40_000)
    delta, dense = sparse_rows(shape, 0.002, 6)
    assert delta.col.dtype == torch.int16 and int(delta.col.min()) < 0  # some columns did wrap in int16
    assert int(delta.columns().max()) >= 32768
    x = torch.randn(2, 1, shape[1], generator=torch.Generator().manual_seed(2))
    expected = x[:, 0] @ dense.T
    matrix = block_diagonal([delta], shape)
    assert matrix is not None
    rows = torch.tensor([0, 1])
    side = grouped_side(matrix, x, 2, rows, torch.tensor([0, 0]), rows)
    torch.testing.assert_close(side[:, 0], expected, rtol=1e-5, atol=1e-5)
    kernel = native_or_skip()
    out = torch.zeros(2, 1, shape[0])
    side_linear(kernel, out, x, native_args(kernel, [(delta, dense)], [0, 0]))
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_native_side_kernel_gives_the_same_bits_on_two_threads_as_on_one() -> None:
    """Enough work to enter the parallel region: threads take tiles from a shared queue, costliest first,
    with slots of very different widths (a Zipf-like batch); each tile's output is its own, so the result is
    the dense product and bit-identical to one thread's."""
    kernel = native_or_skip()
    shape = (300, 200)
    deltas = [sparse_rows(shape, 0.3, seed) for seed in range(4)]
    row_delta = [0] * 11 + [1] * 3 + [2, 3, -1]  # widths 11 (two tiles), 3, 1, 1 and a base row
    x = torch.randn(len(row_delta), 1, shape[1], generator=torch.Generator().manual_seed(3))
    args = native_args(kernel, deltas, row_delta)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.zeros(len(row_delta), 1, shape[0])
            side_linear(kernel, out, x, args)
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    for row, d in enumerate(row_delta):
        expected = x[row] @ deltas[d][1].T if d >= 0 else torch.zeros(1, shape[0])
        torch.testing.assert_close(outs[1][row], expected, rtol=1e-5, atol=1e-5)


def test_native_side_kernel_skips_empty_slots_and_leaves_their_rows_alone() -> None:
    """A delta that leaves a Linear alone still has its slot in the batch's table (nnz 0, no arrays)."""
    kernel = native_or_skip()
    shape = (9, 7)
    (a, dense_a), (b, dense_b) = sparse_rows(shape, 0.4, 1), sparse_rows(shape, 0.4, 2)
    empty = torch.empty(0, dtype=torch.int16)
    table = native.SlotTable(
        kernel,
        [a.crow, empty, b.crow],
        [a.col, empty, b.col],
        [a.values, empty.float(), b.values],
        [a.row, empty, b.row],  # type: ignore[list-item]
        [shape[0]] * 3,
    )
    assert table.table[1, 4] == 0 and table.table[1, 5] == shape[0]
    x = torch.randn(3, 2, shape[1], generator=torch.Generator().manual_seed(4))
    out = torch.randn(3, 2, shape[0], generator=torch.Generator().manual_seed(5))
    before = out.clone()
    kernel.side_linear_(out, x, table.table, torch.tensor([0, 1, 2, 3]), torch.tensor([2, 1, 0]))
    torch.testing.assert_close(out[2], before[2] + x[2] @ dense_a.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], before[1])
    torch.testing.assert_close(out[0], before[0] + x[0] @ dense_b.T, rtol=1e-5, atol=1e-5)


def test_native_slot_packing_rejects_inconsistent_arrays() -> None:
    kernel = native_or_skip()
    shape = (8, 6)
    deltas = [sparse_rows(shape, 0.5, 0)]
    crows, cols, vals, kept = slot_lists(deltas, [0])
    bad = {
        "crow must have": ([crows[0][:-1]], cols, vals, kept),
        "col and val must match": (crows, cols, [vals[0][:-1]], kept),
        "col must be int32 or int16": (crows, [cols[0].long()], vals, kept),
        "crow must be int32": ([crows[0].long()], cols, vals, kept),
        "float32": (crows, cols, [vals[0].double()], kept),
        "contiguous": (crows, [torch.stack([cols[0], cols[0]], 1)[:, 0]], vals, kept),
        "kept_rows must be": (crows, cols, vals, [kept[0].int()]),
        "kept_rows must be empty": (crows, cols, vals, [kept[0][:-1]]),
        "one crow, col, val, kept_rows and out_features": (crows, cols, vals, []),
        "crow must end at nnz": ([crows[0] - crows[0].clamp(max=1)], cols, vals, kept),
    }
    for message, args in bad.items():
        with pytest.raises(RuntimeError, match=message):
            kernel.pack_slots(*args, [shape[0]] * len(args[0]))
    table = kernel.pack_slots(crows, cols, vals, kept, [shape[0]])
    assert table.shape == (1, 7) and table[0, 4] == vals[0].numel() and table[0, 5] == shape[0]


def test_native_side_kernel_rejects_inconsistent_arguments_and_writes_nothing() -> None:
    kernel = native_or_skip()
    shape = (8, 6)
    deltas = [sparse_rows(shape, 0.5, 0)]
    x = torch.randn(2, 1, shape[1])
    out = torch.zeros(2, 1, shape[0])
    table, ptr, rows = native_args(kernel, deltas, [0, 0])
    other = native.SlotTable(kernel, *slot_lists([sparse_rows((5, 6), 0.5, 0)], [0]), [5])
    bad = {
        "row out of range": (out, x, table.table, ptr, torch.tensor([0, 5])),
        "slot_ptr must have": (out, x, table.table, torch.tensor([0, 1, 2]), rows),
        "slot_ptr must span": (out, x, table.table, torch.tensor([0, 1]), rows),
        "table from pack_slots": (out, x, table.table.int(), ptr, rows),
        "packed for 5 output features": (out, x, other.table, ptr, rows),
        "share a dtype": (out.double(), x, table.table, ptr, rows),
        "share \\(B, T\\)": (out[:1], x, table.table, ptr, rows),
    }
    for message, args in bad.items():
        with pytest.raises(RuntimeError, match=message):
            kernel.side_linear_(*args)
    assert not out.any()


def test_block_diagonal_of_deltas_that_leave_a_weight_alone_is_none_or_zero_blocks() -> None:
    shape = (4, 5)
    assert block_diagonal([None, None], shape) is None
    delta, dense = sparse_rows(shape, 0.5, 1)
    matrix = block_diagonal([None, delta], shape)
    assert matrix is not None
    full = matrix.to_dense()
    assert torch.equal(full[:4, :5], torch.zeros(shape)) and torch.equal(full[4:, 5:], dense)


def test_embedding_side_is_exactly_the_patched_embedding_row() -> None:
    vocab, width = 20, 6
    table = torch.randn(vocab, width).to(torch.bfloat16)
    deltas = [sparse_rows((vocab, width), 0.4, seed) for seed in (1, 2)]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (3, 4), generator=gen)
    row_delta = torch.tensor([1, -1, 0])
    out = table[ids]  # (B, T, H) what nn.Embedding returns
    stacked = stack_rows([d[0] for d in deltas], (vocab, width))
    assert stacked is not None
    embedding_side_(out, ids, stacked, row_delta)
    for b, d in enumerate(row_delta.tolist()):
        if d < 0:
            expected = table[ids[b]]
        else:
            flat_index = deltas[d][1].reshape(-1).nonzero().squeeze(1)
            values = deltas[d][1].reshape(-1)[flat_index].to(torch.bfloat16)
            expected = patched(table, flat_index, values)[ids[b]]
        assert torch.equal(out[b], expected), b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_native_embedding_side_is_exactly_the_patched_embedding_row(dtype: torch.dtype) -> None:
    kernel = native_or_skip()
    vocab, width = 20, 6
    table = torch.randn(vocab, width).to(dtype)
    deltas = [sparse_rows((vocab, width), 0.4, seed) for seed in (1, 2)]
    empty = torch.empty(0, dtype=torch.int16)
    slots = native.SlotTable(  # slot 1: a delta that leaves the embedding alone
        kernel,
        [deltas[0][0].crow, empty, deltas[1][0].crow],
        [deltas[0][0].col, empty, deltas[1][0].col],
        [deltas[0][0].values, empty.float(), deltas[1][0].values],
        [empty, empty, empty],
        [vocab] * 3,
    )
    ids = torch.randint(0, vocab, (4, 3), generator=torch.Generator().manual_seed(3))
    out = table[ids]  # (B, T, H) what nn.Embedding returns
    row_slot = [2, -1, 0, 1]  # row 1: the base model; row 3: the empty slot
    ptr, rows = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 0])
    kernel.embedding_side_(out, ids, slots.table, ptr, rows)
    for b, slot in enumerate(row_slot):
        expected = table[ids[b]]
        if slot in (0, 2):
            dense = deltas[slot // 2][1].reshape(-1)
            flat_index = dense.nonzero().squeeze(1)
            expected = patched(table, flat_index, dense[flat_index].to(dtype))[ids[b]]
        assert torch.equal(out[b], expected), b
    before = out.clone()
    bad = ids.clone()
    bad[0, 0] = vocab  # row 0 is served by slot 2
    with pytest.raises(RuntimeError, match="out of range for a vocabulary of 20"):
        kernel.embedding_side_(out, bad, slots.table, ptr, rows)
    assert torch.equal(out, before)  # a rejected call writes nothing


class _RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _Summed(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.sum()  # a stacked per-row weight would mix rows: no exact per-row form


def test_modules_are_classified_by_a_probe_and_unsupported_params_make_a_delta_unmixable() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), _RMSNorm(8), nn.Linear(8, 8, bias=True), _Summed(8))
    uses = find_param_uses(model)
    assert set(uses.linears) == {"2.weight"} and set(uses.embeddings) == {"0.weight"}
    assert set(uses.norms) == {"1.weight"}  # the probe rejects _Summed
    weights = dict(model.named_parameters())
    ok = PreparedDelta("ok", None, (PatchOp("2.weight", torch.tensor([1, 9]), torch.ones(2)),  # type: ignore[arg-type]
                                    PatchOp("1.weight", torch.tensor([0]), torch.ones(1))))  # fmt: skip
    layout = build_mixed(ok, uses, weights)
    assert layout is not None and layout.linear_nnz == 2 and set(layout.norms) == {"1.weight"}
    for target in ("2.bias", "3.weight"):
        bad = PreparedDelta("bad", None, (PatchOp(target, torch.tensor([0]), torch.ones(1)),))  # type: ignore[arg-type]
        assert build_mixed(bad, uses, weights) is None, target
    dense_linear = PreparedDelta("d", None, (PatchOp("2.weight", None, torch.ones(8, 8)),))  # type: ignore[arg-type]
    assert build_mixed(dense_linear, uses, weights) is None


@pytest.mark.parametrize("relay", ["end+begin", "relay"])
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_a_relaid_mixed_batch_gives_each_row_its_own_delta(
    kernel: str, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows join and leave between re-lays, so slot numbers change while the same deltas stay: what the
    batch keeps across re-lays must follow the deltas, not the slot numbers (it once followed the numbers
    and raised KeyError when a finished row's slot 0 left the batch). `relay` keeps the hooks installed;
    after `end` the model is as it was either way."""
    if kernel == "native":
        native_or_skip()
    else:
        monkeypatch.setattr(native, "module", lambda: None)
    from server.engine.mixed.batch import MixedBatch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10, bias=False), _RMSNorm(10), nn.Linear(10, 7, bias=False))
    uses = find_param_uses(model)
    weights = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)

    def delta(name: str) -> PreparedDelta:
        ops = []
        for target, weight in weights.items():
            index = torch.randperm(weight.numel(), generator=gen)[: weight.numel() // 3].sort().values
            ops.append(PatchOp(target, index, torch.randn(index.numel(), generator=gen) * 0.1))
        return PreparedDelta(name, None, tuple(ops))  # type: ignore[arg-type]

    prepared = {name: delta(name) for name in ("a", "b", "c")}
    layouts = {name: build_mixed(d, uses, weights) for name, d in prepared.items()}
    x = torch.randn(3, 1, 12, generator=gen)

    def request(model_name: str) -> GenerationRequest:
        return SimpleNamespace(model=model_name)  # type: ignore[return-value]

    def expected(name: str, row: torch.Tensor) -> torch.Tensor:  # the merged model's output
        merged = {op.target: patched(weights[op.target].detach(), op.index, op.values)
                  for op in prepared[name].ops if op.index is not None}  # fmt: skip
        out: torch.Tensor = torch.func.functional_call(model, merged, (row,))
        return out

    norm_weight = model[1].weight
    batch = MixedBatch(model, uses, {**layouts, "base": None})
    cpu = torch.device("cpu")
    with torch.inference_mode():
        batch.begin([request("a"), request("b")], cpu)
        model(x[:2])
        if relay == "relay":
            batch.relay([request("base")], cpu)  # the base alone: every hook does nothing
            base_out = model(x[:1])
            batch.relay([request("c"), request("a"), request("b")], cpu)
        else:
            batch.end()
            batch.begin([request("c"), request("a"), request("b")], cpu)
        batch.select(torch.tensor([1, 2]))  # c's row finished: a and b keep their slots 1 and 2
        out = model(x[1:])
        batch.end()
        if relay == "relay":
            assert torch.equal(base_out, model(x[:1]))
    for row, name in enumerate(("a", "b")):
        torch.testing.assert_close(out[row], expected(name, x[1 + row]), rtol=1e-5, atol=1e-5)
    assert model[1].weight is norm_weight and isinstance(norm_weight, nn.Parameter)
    assert not any(m._forward_hooks for m in model)
    # A batch runs as long as requests keep joining: it keeps state for two lay-outs' deltas, not all ever seen.
    with torch.inference_mode():
        for name in ("a", "b", "c"):
            batch.relay([request(name)], cpu)
            model(x[:1])
        batch.end()
    kept = {id(layouts["b"]), id(layouts["c"])}
    assert set(batch._pinned) == kept and {key[1] for key in batch._norm_rows} <= kept
    assert set(batch._tables) <= kept


def test_policy_merges_a_dominant_or_lonely_model_and_mixes_a_spread_queue() -> None:
    auto = BatchPolicy("auto", dominance=0.5)

    def choose(picked: str, queued: dict[str, int], overdue: bool = False) -> str | None:
        return auto.merged_model(picked, queued, max_batch=8, overdue=overdue)

    assert choose("a", {"a": 1, "b": 1, "c": 1}) is None
    assert choose("a", {"a": 5, "b": 1, "c": 1}) == "a"
    assert choose("b", {"a": 5, "b": 1, "c": 1}) == "a"  # the dominant model goes first...
    assert choose("b", {"a": 5, "b": 1, "c": 1}, overdue=True) is None  # ...unless b waited too long
    assert choose("a", {"a": 3}) == "a"  # one model: nothing to mix
    assert choose("x", {"a": 1, "b": 1}) == "x"  # the picked model cannot mix
    assert choose("a", {"a": 4, "b": 30}) == "b"  # b alone fills the next batch
    default = BatchPolicy("auto")  # merged only when one model fills a whole batch
    assert default.merged_model("a", {"a": 6, "b": 1}, max_batch=8, overdue=False) is None
    assert default.merged_model("b", {"a": 8, "b": 1}, max_batch=8, overdue=False) == "a"
    assert BatchPolicy("mixed").merged_model("a", {"a": 9}, max_batch=8, overdue=False) is None
    assert BatchPolicy("merged").merged_model("a", {"a": 1, "b": 1}, max_batch=8, overdue=False) == "a"
