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
# A Linear's slots packed for the native kernel (those whose delta changes it), and their positions in group order.
_SlotCsrs = tuple[native.SlotTable, list[int]]
_NO_ROWS = torch.empty(0, dtype=torch.int16)  # a layout without row indices: the native kernel's CSR path


class NativeArgs(NamedTuple):
    """One native side-kernel call's arguments after (out, x): the packed slots with rows; their row groups."""

    slots: native.SlotTable
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
        self._native_args: dict[str, NativeArgs | object | None] = {}  # Linear weight -> its call's arguments
        self._groups: dict[int, list[int]] = {}  # slot -> its rows in the batch
        # Kept across begin/end (rows joining re-lay the batch twice per join): what depends only on which
        # deltas are in it. A norm's patched weight per (name, delta); a Linear's per-slot CSR lists per
        # (name, the deltas with rows, in group order).
        self._norm_rows: dict[tuple[str, int], torch.Tensor] = {}
        self._csr_lists: dict[tuple[str, tuple[int, ...]], _SlotCsrs | None] = {}
        self._group_key: tuple[int, ...] = ()
        self._pinned: dict[
            int, MixedDelta
        ] = {}  # every delta keyed by id above, so no id is reused meanwhile
        # Per refresh: the (slot_ptr, slot_rows) of each set of present slots (one set for nearly every Linear).
        self._row_groups: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    # --- the engine's row hooks ---

    def begin(self, requests: Sequence[GenerationRequest], device: torch.device) -> None:
        """Lay out the rows (in batch order), install the hooks and the stacked norm weights. After `end`,
        `begin` may run again with other rows (rows joining a running batch re-lay it)."""
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
        chunking = plan_chunks(row_delta, [d.linear_nnz for d in self._slots])
        self._width, self._chunks, self._row_slot = chunking.width, chunking.chunks, list(chunking.row_slot)
        self._device = device
        self._native = native.module() if device.type == "cpu" else None
        self._row_delta = torch.tensor(row_delta, dtype=torch.long, device=device)
        self._install()
        self._refresh()

    def select(self, keep: torch.Tensor) -> None:
        """Rows `keep` (K,) stay in the batch; finished rows leave their column slots as padding."""
        self._row_delta = self._row_delta[keep]
        self._row_slot = [self._row_slot[i] for i in keep.tolist()]
        self._refresh()

    def end(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for _, modules, parameter in self._norms.values():
            for module in modules:
                module._parameters["weight"] = parameter
        self._norms.clear()
        self._matrices.clear()
        self._stacks.clear()
        self._native_args.clear()

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
        self._native_args.clear()  # their row groups changed
        self._groups = {}
        for row, slot in enumerate(self._row_delta.tolist()):
            if slot >= 0:
                self._groups.setdefault(slot, []).append(row)
        self._group_key = tuple(id(self._slots[slot]) for slot in self._groups)
        self._row_groups.clear()
        for table, modules, _ in self._norms.values():
            rows = table.index_select(0, self._row_delta + 1).unsqueeze(1)  # (B, 1, H) per-row weights
            for module in modules:
                module._parameters["weight"] = rows  # type: ignore[assignment]

    def _install(self) -> None:
        touched = {name for delta in self._slots for name in (*delta.matrices, *delta.norms)}
        for name in touched:
            for linear in self.uses.linears.get(name, ()):
                self._handles.append(linear.register_forward_hook(self._linear_hook(name)))
            for embedding in self.uses.embeddings.get(name, ()):
                self._handles.append(embedding.register_forward_hook(self._embedding_hook(name)))
            norms = list(self.uses.norms.get(name, ()))
            if norms:
                parameter = norms[0].get_parameter("weight")
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

    def _native_call(self, name: str) -> NativeArgs | object | None:
        """The native kernel's arguments for Linear `name` (the slots with rows that change it, their CSRs,
        their row groups); None when no row's delta changes it; `_TORCH` when a layout is not the kernel's
        (float32 values), so the torch-ops path runs instead."""
        if name in self._native_args:
            return self._native_args[name]
        key = (name, self._group_key)
        if key not in self._csr_lists:
            self._csr_lists[key] = self._slot_csrs(name)
        lists = self._csr_lists[key]
        args: NativeArgs | object | None
        if lists is None:
            args = _TORCH
        else:
            slots, present = lists
            args = NativeArgs(slots, *self._rows_of(present)) if present else None
        self._native_args[name] = args
        return args

    def _rows_of(self, present: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_ptr, slot_rows) of the slots at `present` positions in group order, built once per refresh."""
        key = tuple(present)
        if key not in self._row_groups:
            groups = list(self._groups.values())
            ptr, rows = [0], []
            for position in present:
                rows.extend(groups[position])
                ptr.append(len(rows))
            self._row_groups[key] = (
                torch.tensor(ptr, dtype=torch.long),
                torch.tensor(rows, dtype=torch.long),
            )
        return self._row_groups[key]

    def _slot_csrs(self, name: str) -> _SlotCsrs | None:
        """Per slot with rows whose delta changes Linear `name`: its CSR arrays, and the slots' positions in
        group order (slot numbers change between re-lays; the cache key, the deltas in group order, does
        not); None when a layout is not the kernel's (values not float32)."""
        crows, cols, vals, kept_rows, present = [], [], [], [], []
        for position, slot in enumerate(self._groups):
            matrix = self._slots[slot].matrices.get(name)
            if matrix is None or matrix.nnz == 0:
                continue
            if matrix.values.dtype != torch.float32:
                return None
            crows.append(matrix.crow)
            cols.append(matrix.col)
            vals.append(matrix.values)
            kept_rows.append(_NO_ROWS if matrix.row is None else matrix.row)
            present.append(position)
        assert self._native is not None
        table = native.SlotTable(self._native, crows, cols, vals, kept_rows, self.uses.shapes[name][0])
        return table, present

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
                self._native.side_linear_(out3, x3, call.slots.table, call.slot_ptr, call.slot_rows)
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
            if name not in self._stacks:
                blocks = [delta.matrices.get(name) for delta in self._slots]
                shape = self.uses.shapes[name]
                self._stacks[name] = stack_rows(blocks, (shape[0], shape[1]))
            stacked = self._stacks[name]
            ids = args[0]
            if stacked is not None:
                embedding_side_(out, ids.reshape(ids.shape[0], -1), stacked, self._row_delta)

        return hook
