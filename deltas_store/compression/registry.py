"""The pruning methods: configured instances of one class, in one registry.

`density` is always the fraction kept (1 - drop_rate). Each method decides *which* delta entries survive
and *what scale* the survivors get; the arithmetic that applies them lives in deltas_store.patching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from deltas_store.compression.sparsify import seeded_keep_indices, topk_keep_indices
from deltas_store.errors import UnknownMethodError


@dataclass(frozen=True)
class PruningMethod:
    """A delta-parameter pruning method.

    selection: "random" keeps each entry independently with probability density (seeded, portable mask);
    "magnitude" keeps the density fraction of largest |delta| per tensor.
    rescale: "density" multiplies survivors by 1/density (DARE), "q" by 1/q (DAREx-q), "none" by 1.
    """

    name: str
    paper: str
    selection: Literal["random", "magnitude"]
    rescale: Literal["density", "q", "none"]

    @property
    def seeded(self) -> bool:
        """Random masks are regenerated from the seed, so the file needs no index data."""
        return self.selection == "random"

    def keep_indices(self, delta: torch.Tensor, density: float, seed: int, tensor_name: str) -> torch.Tensor:
        """Sorted int64 flat indices of the entries of `delta` this method keeps."""
        if self.selection == "random":
            return seeded_keep_indices(delta.numel(), density, seed, tensor_name, device=delta.device)
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

METHODS: dict[str, PruningMethod] = {m.name: m for m in (DARE, DAREX_Q, MAGNITUDE)}


def get_method(name: str) -> PruningMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None
