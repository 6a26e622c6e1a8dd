"""Streaming extraction of deltas: pair a fine-tune's tensors with the base's, one pair at a time."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from deltas_store.checkpoint import ModelDir
from deltas_store.errors import ArchitectureMismatchError
from deltas_store.format.manifest import to_base_name

# The official DAREx decoder code prunes only attention and MLP matrices; encoders prune everything.
PRUNE_SCOPES: dict[str, re.Pattern[str] | None] = {
    "all": None,
    "attn-mlp": re.compile(r"(self_attn|mlp)\."),
}


@dataclass(frozen=True)
class Alignment:
    """finetune name = finetune_prefix + rest, base name = base_prefix + rest."""

    finetune_prefix: str
    base_prefix: str
    matched: int


@dataclass(frozen=True)
class ParamDelta:
    """One fine-tune parameter, classified.

    kind "delta": `delta` is (finetune - base) in float32, to be pruned;
    kind "dense": `value` is the fine-tune's tensor, stored whole (new, resized, or kept dense);
    kind "unchanged": exactly equal to the base, stored nowhere.
    """

    name: str
    base_name: str
    kind: Literal["delta", "dense", "unchanged"]
    dtype: torch.dtype
    shape: tuple[int, ...]
    delta: torch.Tensor | None = None
    value: torch.Tensor | None = None


def align_names(base: ModelDir, finetune: ModelDir) -> Alignment:
    """Find the prefix rule (e.g. `bert.` on the fine-tune side) that pairs the most tensor names."""
    base_names, ft_names = set(base.names()), finetune.names()
    prefixes = {""} | {n.split(".", 1)[0] + "." for n in ft_names if "." in n}
    base_prefixes = {""} | {n.split(".", 1)[0] + "." for n in base_names if "." in n}
    best = Alignment("", "", 0)
    for ft_prefix in sorted(prefixes):
        for base_prefix in sorted(base_prefixes):
            if ft_prefix and base_prefix:
                continue
            matched = sum(to_base_name(n, ft_prefix, base_prefix) in base_names for n in ft_names)
            if matched > best.matched:
                best = Alignment(ft_prefix, base_prefix, matched)
    return best


def check_compatible(base: ModelDir, finetune: ModelDir, alignment: Alignment) -> None:
    base_type, ft_type = base.config.get("model_type"), finetune.config.get("model_type")
    if base_type and ft_type and base_type != ft_type:
        raise ArchitectureMismatchError(
            f"the fine-tune is a {ft_type!r} model but the base is {base_type!r}: not a fine-tune of this base"
        )
    if alignment.matched < max(1, len(base.names()) // 2):
        raise ArchitectureMismatchError(
            f"only {alignment.matched} of the base's {len(base.names())} tensors have a counterpart in the "
            "fine-tune: not a fine-tune of this base"
        )


def iter_param_deltas(
    base: ModelDir,
    finetune: ModelDir,
    alignment: Alignment,
    *,
    keep_dense: Sequence[re.Pattern[str]] = (),
    prune_scope: str = "all",
) -> Iterator[ParamDelta]:
    """Yield every fine-tune parameter classified; holds at most one (base, fine-tune) tensor pair."""
    scope = PRUNE_SCOPES[prune_scope]
    for name in finetune.names():
        ft = finetune.get_tensor(name)
        base_name = to_base_name(name, alignment.finetune_prefix, alignment.base_prefix)
        shape, dtype = tuple(ft.shape), ft.dtype
        if base_name not in base:
            yield ParamDelta(name, base_name, "dense", dtype, shape, value=ft)
            continue
        b = base.get_tensor(base_name)
        if tuple(b.shape) != shape or not ft.is_floating_point():
            kind: Literal["dense", "unchanged"] = (
                "unchanged" if tuple(b.shape) == shape and torch.equal(b, ft) else "dense"
            )
            yield ParamDelta(name, base_name, kind, dtype, shape, value=ft if kind == "dense" else None)
            continue
        if torch.equal(b, ft):  # exact-zero deltas are free
            yield ParamDelta(name, base_name, "unchanged", dtype, shape)
            continue
        in_scope = scope is None or scope.search(name) is not None
        if not in_scope or any(p.search(name) for p in keep_dense):
            yield ParamDelta(name, base_name, "dense", dtype, shape, value=ft)
            continue
        yield ParamDelta(name, base_name, "delta", dtype, shape, delta=ft.float() - b.float())
