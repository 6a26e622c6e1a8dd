"""Exact hot-swap of a delta onto resident weights: validate all, gather originals, patch, restore.

The arithmetic here is the one definition of "base + delta" used everywhere (the `apply` command, the
server, CPU, CUDA): kept values are cast to the weight's dtype, then ``w[i] = w[i] + v[i]`` in that dtype.
Restoring writes the saved originals back (never subtracts), so the base is bit-identical afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from deltas_store.errors import ArchitectureMismatchError, BaseMismatchError
from deltas_store.format.io import Delta
from deltas_store.format.manifest import Manifest


@dataclass(frozen=True)
class PatchOp:
    """One resident tensor's patch: kept positions and values (sparse), or a whole replacement (dense)."""

    target: str
    index: torch.Tensor | None  # (nnz,) int64 flat positions on the weight's device; None = dense
    values: torch.Tensor  # (nnz,) or the full tensor, in the weight's dtype and on its device

    @property
    def nbytes(self) -> int:
        idx = self.index.nbytes if self.index is not None else 0
        return idx + self.values.nbytes


@dataclass(frozen=True)
class PreparedDelta:
    """A delta checked against one set of resident weights and laid out ready to patch them."""

    name: str
    manifest: Manifest
    ops: tuple[PatchOp, ...]

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops)


@dataclass(frozen=True)
class SavedOriginals:
    """What `apply_delta_` overwrote; `restore_` writes it back."""

    delta_name: str
    saved: tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor], ...]  # (weight, index, original)


def check_base(manifest: Manifest, fingerprint: str) -> None:
    """Raise BaseMismatchError unless the delta was made for the base with this fingerprint."""
    if manifest.base.fingerprint != fingerprint:
        raise BaseMismatchError(
            f"delta {manifest.name!r} was made for base {manifest.base.id!r} "
            f"(fingerprint {manifest.base.fingerprint[:19]}…), not for this base ({fingerprint[:19]}…)"
        )


def prepare_delta(delta: Delta, weights: Mapping[str, torch.Tensor]) -> PreparedDelta:
    """Check every name, shape and dtype against `weights` (named by the base) and build patch ops.

    Raises ArchitectureMismatchError before anything is touched if the delta does not fit.
    """
    manifest = delta.manifest
    ops: list[PatchOp] = []
    for name, sp in delta.sparse.items():
        weight = _target(weights, manifest, name)
        if tuple(weight.shape) != tuple(sp.shape):
            raise ArchitectureMismatchError(
                f"delta {manifest.name!r}: {name} has shape {tuple(sp.shape)}, the base has {tuple(weight.shape)}"
            )
        index = sp.indices.to(device=weight.device, dtype=torch.int64)
        ops.append(PatchOp(manifest.base_name(name), index, sp.values.to(weight.device, weight.dtype)))
    for name, dp in delta.dense.items():
        weight = _target(weights, manifest, name)
        if tuple(weight.shape) != tuple(dp.value.shape):
            raise ArchitectureMismatchError(
                f"delta {manifest.name!r}: {name} changes shape {tuple(weight.shape)} -> "
                f"{tuple(dp.value.shape)}; it cannot be hot-swapped (use `deltaserve apply`)"
            )
        ops.append(PatchOp(manifest.base_name(name), None, dp.value.to(weight.device, weight.dtype)))
    return PreparedDelta(manifest.name, manifest, tuple(ops))


def _target(weights: Mapping[str, torch.Tensor], manifest: Manifest, name: str) -> torch.Tensor:
    target = manifest.base_name(name)
    weight = weights.get(target)
    if weight is None:
        raise ArchitectureMismatchError(
            f"delta {manifest.name!r}: parameter {name} (base name {target}) does not exist in the base model"
        )
    if not weight.is_contiguous():
        raise ArchitectureMismatchError(f"resident weight {target} is not contiguous; cannot patch in place")
    return weight


def patched(weight: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new tensor equal to `weight` with `values` added at flat `index` (the canonical arithmetic)."""
    out = weight.clone()
    flat = out.view(-1)
    flat.index_copy_(0, index, flat.index_select(0, index) + values.to(weight.dtype))
    return out


def apply_delta_(weights: Mapping[str, torch.Tensor], prepared: PreparedDelta) -> SavedOriginals:
    """Patch the resident weights in place; returns the originals to hand to `restore_`."""
    saved: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for op in prepared.ops:
                weight = weights[op.target]
                if op.index is None:
                    saved.append((weight, None, weight.detach().clone()))
                    weight.copy_(op.values)
                    continue
                flat = weight.view(-1)
                original = flat.index_select(0, op.index)  # one gather
                saved.append((weight, op.index, original))
                flat.index_copy_(0, op.index, original + op.values)
    except BaseException:
        restore_(SavedOriginals(prepared.name, tuple(saved)))  # never leave half-swapped weights
        raise
    return SavedOriginals(prepared.name, tuple(saved))


def restore_(saved: SavedOriginals) -> None:
    """Write the saved originals back: the weights are bit-identical to before `apply_delta_`."""
    with torch.no_grad():
        for weight, index, original in reversed(saved.saved):
            if index is None:
                weight.copy_(original)
            else:
                weight.view(-1).index_copy_(0, index, original)
