"""One mixed batch: each row's delta applied on the side of the base forward; no resident weight is written."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from deltas_store import native
from server.engine.mixed.kernels import (
    StackedRows,
    block_diagonal,
    embedding_side_,
    grouped_side,
    plan_chunks,
    stack_rows,
)
from server.engine.mixed.layout import MixedDelta
from server.engine.mixed.modules import ParamUses
from server.engine.request import GenerationRequest

_Hook = Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]
_TORCH = object()  # a Linear whose side term the torch-ops path computes
# An absent array: no row indices (the native kernel's CSR path), or no kept values (a weight the delta leaves alone).
_EMPTY = torch.empty(0, dtype=torch.int16)


class KernelTable(NamedTuple):
    """One delta's slots for the native kernels, one per Linear and embedding weight of the model (nnz 0
    where the delta leaves one alone), and the weights whose values the kernels do not take."""

    slots: native.SlotTable
    torch_only: frozenset[str]


class NativeArgs(NamedTuple):
    """One native side-kernel call's arguments after (out, x or ids): the batch's slots for one weight, in
    group order (a row of every delta's KernelTable, stacked); their row groups."""

    table: torch.Tensor  # (S, fields) int64, a view into the batch's stacked tables
    slot_ptr: torch.Tensor  # (S + 1,) int64 offsets into slot_rows
    slot_rows: torch.Tensor  # (A,) int64 batch rows, grouped by slot


class MixedBatch:
    """Serves rows of different deltas (and of the base) in one forward over the resident *base* weights.

    Per Linear: ``y = base(x) + x·ΔW_{d(row)}ᵀ``, one grouped sparse matmul for the whole batch (a hook).
    Per embedding: each token's ΔE row added (exact). Per RMSNorm-like module (``weight * g(x)``): for the
    batch's duration the module reads a (B, 1, H) stack of per-row patched weights instead of its own
    parameter, so each row gets exactly its merged output. The engine calls `begin`, `select`, `end`
    (and `end` + `begin` again when rows join the running batch). `deltas` may gain models meanwhile.

    Example:
        >>> batch = MixedBatch(model, uses, {"math": mixed_math, "base": None})  # doctest: +SKIP
        >>> engine.generate(requests, hooks=batch)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, uses: ParamUses, deltas: Mapping[str, MixedDelta | None]) -> None:
        self.model = model
        self.uses = uses
        self.deltas = deltas  # request.model -> its layout (None: the base model)
        self._handles: list[RemovableHandle] = []
        self._hooked: set[str] = set()  # the weights whose modules carry a hook now
        self._slots: list[MixedDelta] = []  # the distinct served deltas of this batch
        self._width = 1
        self._chunks: tuple[int, ...] = ()
        self._matrices: dict[str, torch.Tensor | None] = {}  # Linear weight -> block-diagonal ΔW, lazily
        self._stacks: dict[str, StackedRows | None] = {}  # embedding weight -> stacked ΔE rows, lazily
        self._norms: dict[str, tuple[torch.Tensor, list[nn.Module], nn.Parameter]] = {}  # (D+1, H) table
        self._row_delta = torch.empty(0, dtype=torch.long)  # (B,) slot of each row, -1 = base
        self._row_slot: list[int] = []  # (B,) column slot of each row, -1 = base
        self._slot_row = torch.empty(0, dtype=torch.long)  # (K*width,) the row feeding each column slot
        self._active = torch.empty(0, dtype=torch.long)  # (A,) rows with a delta
        self._chunk = torch.empty(0, dtype=torch.long)  # (A,) their chunk
        self._column = torch.empty(0, dtype=torch.long)  # (A,) their column inside it
        self._device = torch.device("cpu")
        self._native: native.NativeKernels | None = None  # the C++ kernels, on CPU where they are built
        self._groups: dict[int, list[int]] = {}  # slot -> its rows in the batch
        # The weights the native kernels serve: every Linear's and embedding's (a tied one once).
        self._kernel_index = {n: i for i, n in enumerate(dict.fromkeys([*uses.linears, *uses.embeddings]))}
        # Per refresh: every weight's kernel slots (L, S, fields) in group order, and their row groups;
        # each weight's call arguments, built on its first call after the refresh.
        self._stacked: list[torch.Tensor] = []  # (L,) views (S, fields)
        self._changes: list[bool] = []  # (L,) whether any slot has kept values in weight l
        self._native_args: dict[str, NativeArgs | object | None] = {}
        self._torch_only: set[str] = set()
        self._slot_ptr = torch.empty(0, dtype=torch.long)
        self._slot_rows = torch.empty(0, dtype=torch.long)
        # Kept across re-lays (rows joining re-lay the batch twice per join) for the deltas of the current
        # and the previous lay-out, keyed by the delta's id (those deltas are pinned, so no id is reused
        # meanwhile): a norm's patched weight per (name, delta); a delta's kernel slots.
        self._norm_rows: dict[tuple[str, int], torch.Tensor] = {}
        self._tables: dict[int, KernelTable] = {}
        self._pinned: dict[int, MixedDelta] = {}

    # --- the engine's row hooks ---

    def begin(self, requests: Sequence[GenerationRequest], device: torch.device) -> None:
        """Lay out the rows (in batch order), install the hooks and the stacked norm weights. After `end`,
        `begin` may run again with other rows."""
        self._lay_out(requests, device)
        self._install()
        self._refresh()

    def relay(self, requests: Sequence[GenerationRequest], device: torch.device) -> None:
        """`end` then `begin(requests)`, keeping the installed hooks (rows joining a running batch re-lay it
        twice: registering a hook per Linear each time cost more than the rest of the re-lay)."""
        if not self._handles:
            self.end()
            self.begin(requests, device)
            return
        self._lay_out(requests, device)
        self._matrices.clear()  # the torch-ops path's per-layout matrices
        self._stacks.clear()
        self._install()
        self._refresh()

    def _lay_out(self, requests: Sequence[GenerationRequest], device: torch.device) -> None:
        previous = {id(delta) for delta in self._slots}
        self._slots = []
        slot_of: dict[str, int] = {}  # one slot per served model (two names may share one file)
        row_delta: list[int] = []
        for request in requests:
            delta = self.deltas.get(request.model)
            if delta is None:
                row_delta.append(-1)
                continue
            if request.model not in slot_of:
                slot_of[request.model] = len(self._slots)
                self._slots.append(delta)
                self._pinned[id(delta)] = delta
            row_delta.append(slot_of[request.model])
        # A batch may run for as long as requests keep joining: forget the deltas of older lay-outs.
        keep = previous | {id(delta) for delta in self._slots}
        self._pinned = {k: d for k, d in self._pinned.items() if k in keep}
        self._tables = {k: t for k, t in self._tables.items() if k in keep}
        self._norm_rows = {k: r for k, r in self._norm_rows.items() if k[1] in keep}
        chunking = plan_chunks(row_delta, [d.linear_nnz for d in self._slots])
        self._width, self._chunks, self._row_slot = chunking.width, chunking.chunks, list(chunking.row_slot)
        self._device = device
        self._native = native.module() if device.type == "cpu" else None
        self._row_delta = torch.tensor(row_delta, dtype=torch.long, device=device)

    def select(self, keep: torch.Tensor) -> None:
        """Rows `keep` (K,) stay in the batch; finished rows leave their column slots as padding."""
        self._row_delta = self._row_delta[keep]
        self._row_slot = [self._row_slot[i] for i in keep.tolist()]
        self._refresh()

    def end(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        for _, modules, parameter in self._norms.values():
            for module in modules:
                module._parameters["weight"] = parameter
        self._norms.clear()
        self._matrices.clear()
        self._stacks.clear()

    # --- per-row state ---

    def _refresh(self) -> None:
        slots = len(self._chunks) * self._width
        slot_row = [0] * slots  # padding slots read row 0: their products are never used
        active: list[int] = []
        for row, slot in enumerate(self._row_slot):
            if slot >= 0:
                slot_row[slot] = row
                active.append(row)
        device = self._device
        self._slot_row = torch.tensor(slot_row, dtype=torch.long, device=device)
        self._active = torch.tensor(active, dtype=torch.long, device=device)
        where = [self._row_slot[row] for row in active]
        self._chunk = torch.tensor([s // self._width for s in where], dtype=torch.long, device=device)
        self._column = torch.tensor([s % self._width for s in where], dtype=torch.long, device=device)
        self._groups = {}
        for row, slot in enumerate(self._row_delta.tolist()):
            if slot >= 0:
                self._groups.setdefault(slot, []).append(row)
        self._native_args.clear()
        if self._native is not None:
            self._stack_tables()
        for table, modules, _ in self._norms.values():
            rows = table.index_select(0, self._row_delta + 1).unsqueeze(1)  # (B, 1, H) per-row weights
            for module in modules:
                module._parameters["weight"] = rows  # type: ignore[assignment]

    def _install(self) -> None:
        """Hooks on the weights the batch's deltas change (those not hooked yet: a hook whose weight no
        delta of the current lay-out changes does nothing), and the norms' tables for the current slots."""
        touched = {name for delta in self._slots for name in (*delta.matrices, *delta.norms)}
        for name in touched - self._hooked:
            for linear in self.uses.linears.get(name, ()):
                self._handles.append(linear.register_forward_hook(self._linear_hook(name)))
            for embedding in self.uses.embeddings.get(name, ()):
                self._handles.append(embedding.register_forward_hook(self._embedding_hook(name)))
            self._hooked.add(name)
        for name in [n for n in self._norms if n not in touched]:  # left alone by every delta now
            _, modules, parameter = self._norms.pop(name)
            for module in modules:
                module._parameters["weight"] = parameter
        for name in touched:
            norms = list(self.uses.norms.get(name, ()))
            if norms:
                parameter = self._norms[name][2] if name in self._norms else norms[0].get_parameter("weight")
                self._norms[name] = (self._norm_table(name, parameter.detach()), norms, parameter)

    def _norm_table(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """(D+1, H): the base weight (resident and unpatched now), then each slot's patched weight."""
        return torch.stack([base, *(self._norm_row(name, base, delta) for delta in self._slots)])

    def _norm_row(self, name: str, base: torch.Tensor, delta: MixedDelta) -> torch.Tensor:
        """`delta`'s patched weight of norm `name` (deltas_store's arithmetic), computed once per batch."""
        key = (name, id(delta))
        row = self._norm_rows.get(key)
        if row is None:
            if name not in delta.norms:
                row = base
            else:
                index, values = delta.norms[name]
                if index is None:
                    row = values.to(base.dtype)
                else:
                    row = base.clone()
                    row[index] = base[index] + values
            self._norm_rows[key] = row
        return row

    # --- hooks ---

    def _stack_tables(self) -> None:
        """Every weight's native slots for this refresh: row l of each present delta's KernelTable, in group
        order (one stack, no per-weight work), and the row groups they serve."""
        tables = [self._kernel_table(self._slots[slot]) for slot in self._groups]
        self._torch_only = set().union(*(t.torch_only for t in tables))
        ptr, rows = [0], []
        for group in self._groups.values():
            rows.extend(group)
            ptr.append(len(rows))
        self._slot_ptr = torch.tensor(ptr, dtype=torch.long)
        self._slot_rows = torch.tensor(rows, dtype=torch.long)
        if tables:
            stacked = torch.stack([t.slots.table for t in tables], dim=1)  # (L, S, fields)
            self._stacked = list(stacked.unbind(0))
            self._changes = stacked[:, :, 4].gt(0).any(1).tolist()
        else:
            self._stacked, self._changes = [], [False] * len(self._kernel_index)

    def _kernel_table(self, delta: MixedDelta) -> KernelTable:
        """`delta`'s slots over every Linear and embedding, validated and packed once per batch and delta."""
        assert self._native is not None
        cached = self._tables.get(id(delta))
        if cached is not None:
            return cached
        crows, cols, vals, kept_rows, outs, torch_only = [], [], [], [], [], set()
        for name in self._kernel_index:
            matrix = delta.matrices.get(name)
            if matrix is not None and matrix.nnz and matrix.values.dtype == torch.float32:
                crows.append(matrix.crow)
                cols.append(matrix.col)
                vals.append(matrix.values)
                kept_rows.append(_EMPTY if matrix.row is None else matrix.row)
            else:
                if matrix is not None and matrix.nnz:
                    torch_only.add(name)  # values the kernels do not take (a float64 model): torch ops
                crows.append(_EMPTY)
                cols.append(_EMPTY)
                vals.append(_EMPTY)
                kept_rows.append(_EMPTY)
            outs.append(int(self.uses.shapes[name][0]))
        slots = native.SlotTable(self._native, crows, cols, vals, kept_rows, outs)
        table = KernelTable(slots, frozenset(torch_only))
        self._tables[id(delta)] = table
        return table

    def _native_call(self, name: str) -> NativeArgs | object | None:
        """The native kernels' arguments for weight `name`; None when no row's delta changes it; `_TORCH`
        when a delta's values there are not the kernels' (float32), so the torch-ops path runs instead."""
        if name in self._native_args:
            return self._native_args[name]
        args: NativeArgs | object | None = _TORCH
        if name not in self._torch_only:
            index = self._kernel_index[name]
            args = (
                NativeArgs(self._stacked[index], self._slot_ptr, self._slot_rows)
                if self._changes[index]
                else None
            )
        self._native_args[name] = args
        return args

    def _linear_hook(self, name: str) -> _Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            call = self._native_call(name) if self._native is not None else _TORCH
            if call is None:
                return  # no row's delta changes this Linear
            if call is not _TORCH:
                assert self._native is not None and isinstance(call, NativeArgs)
                x = args[0]
                x3 = x.reshape(x.shape[0], -1, x.shape[-1]).contiguous()
                out3 = out.view(out.shape[0], -1, out.shape[-1])
                self._native.side_linear_(out3, x3, call.table, call.slot_ptr, call.slot_rows)
                return
            if name not in self._matrices:
                blocks = [self._slots[s].matrices.get(name) for s in self._chunks]
                shape = self.uses.shapes[name]
                self._matrices[name] = block_diagonal(blocks, (shape[0], shape[1]))
            matrix = self._matrices[name]
            if matrix is None or self._active.numel() == 0:
                return
            x = args[0]
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
            side = grouped_side(matrix, x3, self._width, self._slot_row, self._chunk, self._column)
            out.view(out.shape[0], -1, out.shape[-1]).index_add_(0, self._active, side.to(out.dtype))

        return hook

    def _embedding_hook(self, name: str) -> _Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            call = self._native_call(name) if self._native is not None else _TORCH
            if call is None:
                return  # no row's delta changes this embedding
            if call is not _TORCH:
                assert self._native is not None and isinstance(call, NativeArgs)
                ids = args[0].reshape(args[0].shape[0], -1).contiguous()
                out3 = out.view(ids.shape[0], ids.shape[1], out.shape[-1])
                self._native.embedding_side_(out3, ids, call.table, call.slot_ptr, call.slot_rows)
                return
            if name not in self._stacks:
                blocks = [delta.matrices.get(name) for delta in self._slots]
                shape = self.uses.shapes[name]
                self._stacks[name] = stack_rows(blocks, (shape[0], shape[1]))
            stacked = self._stacks[name]
            ids = args[0]
            if stacked is not None:
                embedding_side_(out, ids.reshape(ids.shape[0], -1), stacked, self._row_delta)

        return hook
