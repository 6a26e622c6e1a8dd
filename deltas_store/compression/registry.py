"""The pruning methods: configured instances of one class, in one registry.

`density` is always the fraction kept (1 - drop_rate). Each method decides *which* delta entries survive
and *what scale* the survivors get; the arithmetic that applies them lives in deltas_store.patching.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from deltas_store.compression.sparsify import (
    seeded_keep_blocks,
    structural_keep_indices,
    topk_keep_indices,
    wanda_keep_indices,
)
from deltas_store.errors import UnknownMethodError
from deltas_store.format import encoding as enc
from deltas_store.format.manifest import Encoding

Selection = Literal["random", "magnitude", "wanda", "columns", "rows"]


@dataclass(frozen=True)
class PruningMethod:
    """A delta-parameter pruning method.

    selection: "random" keeps each entry independently with probability density (seeded, portable mask);
    "magnitude" keeps the density fraction of largest |delta| per tensor; "wanda" keeps the density fraction
    of largest |delta_ij| * ||X_j||_2 per output row of a Linear weight (calibration activations; tensors
    without activations fall back to magnitude); "columns" / "rows" keep whole columns / rows, each with
    probability density (structural DPP, seeded).
    rescale: "density" multiplies survivors by 1/density (DARE), "q" by 1/q (DAREx-q), "none" by 1.
    block: random selection only: keep aligned runs of this many entries whole (`with_block`); 1 = entries.
    """

    name: str
    paper: str
    selection: Selection
    rescale: Literal["density", "q", "none"]
    block: int = 1

    def with_block(self, block: int) -> PruningMethod:
        """This method with a block mask: each aligned run of `block` entries is kept or dropped whole."""
        if block < 1:
            raise ValueError(f"mask block must be at least 1, got {block}")
        if block > 1 and self.selection != "random":
            raise ValueError(f"a mask block applies to random masks (dare, darex-q), not {self.name!r}")
        return replace(self, block=block)

    @property
    def seeded(self) -> bool:
        """Random masks are regenerated from the seed, so the file needs no index data."""
        return self.selection == "random"

    @property
    def random(self) -> bool:
        """The mask depends on the seed (so a q search can average over several seeds)."""
        return self.selection in ("random", "columns", "rows")

    @property
    def needs_activations(self) -> bool:
        return self.selection == "wanda"

    @property
    def encoding(self) -> Encoding:
        """How the kept positions are stored (deltas_store.format.encoding)."""
        if self.selection == "random":
            return enc.SEEDED_BLOCKS if self.block > 1 else enc.SEEDED
        if self.selection == "columns":
            return enc.COLUMNS
        if self.selection == "rows":
            return enc.ROWS
        return enc.VARINT_GAPS

    def keep_indices(
        self,
        delta: torch.Tensor,
        density: float,
        seed: int,
        tensor_name: str,
        input_norm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sorted int64 flat indices of the entries of `delta` this method keeps.

        input_norm: (in,) L2 norms of a Linear's input features (wanda only).
        """
        if self.selection == "random":
            return seeded_keep_blocks(delta.numel(), density, seed, tensor_name, self.block, delta.device)
        if self.selection in ("columns", "rows"):
            shape = tuple(delta.shape)
            return structural_keep_indices(shape, density, seed, tensor_name, self.selection).to(delta.device)
        if self.selection == "wanda" and input_norm is not None and delta.dim() == 2:
            return wanda_keep_indices(delta, input_norm, density)
        return topk_keep_indices(delta.abs(), density)

    def scale(self, density: float, q: float | None) -> float:
        """The factor applied to every kept delta."""
        if self.rescale == "density":
            return 1.0 / density
        if self.rescale == "q":
            if q is None:
                raise ValueError(f"method {self.name!r} needs q")
            if not density - 1e-12 <= q <= 1.0:
                raise ValueError(f"q must be in [density, 1] = [{density:g}, 1], got {q:g}")
            return 1.0 / q
        return 1.0


DARE = PruningMethod(
    "dare", "Yu et al. 2023, Language Models are Super Mario (arXiv 2311.03099)", "random", "density"
)
DAREX_Q = PruningMethod("darex-q", "Deng et al. 2024, DARE the Extreme (arXiv 2410.09344)", "random", "q")
MAGNITUDE = PruningMethod(
    "magnitude", "magnitude pruning of deltas (MP), as in arXiv 2410.09344", "magnitude", "none"
)

WANDA = PruningMethod(
    "wanda",
    "WANDA scores (Sun et al. 2023, arXiv 2306.11695) applied to deltas, as in arXiv 2410.09344",
    "wanda",
    "none",
)
STRUCTURAL = PruningMethod(
    "structural", "structural DPP: whole columns with 1/q, arXiv 2410.09344 (Sec. 6)", "columns", "q"
)
STRUCTURAL_ROWS = PruningMethod(
    "structural-rows", "structural DPP: whole rows with 1/q, arXiv 2410.09344 (Sec. 6)", "rows", "q"
)

METHODS: dict[str, PruningMethod] = {
    m.name: m for m in (DARE, DAREX_Q, MAGNITUDE, WANDA, STRUCTURAL, STRUCTURAL_ROWS)
}
AUTO = "auto"  # not a method: deltas_store.compression.autoselect picks one of METHODS


def get_method(name: str) -> PruningMethod:
    try:
        return METHODS[name]
    except KeyError:
        valid = ", ".join([*METHODS, AUTO])
        raise UnknownMethodError(f"unknown method {name!r}; valid methods: {valid}") from None
