"""One streaming pass over base and fine-tune: classify every tensor, keep each mask seed's entries, and
gather what the q search and `auto` need (Algorithm 3's row sums, delta statistics). Holds at most one
(base, fine-tune) tensor pair beyond what it keeps."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from deltas_store.calibration import InputStats
from deltas_store.checkpoint import ModelDir
from deltas_store.compression.autoselect import DeltaStats
from deltas_store.compression.perlayer import RowSums
from deltas_store.compression.qtuning import Kept
from deltas_store.compression.registry import PruningMethod
from deltas_store.extraction import Alignment, iter_param_deltas
from deltas_store.format.io import DenseParam
from deltas_store.progress import progress


@dataclass(frozen=True)
class PrunedParam:
    """A pruned parameter's identity: its base name, the fine-tune's dtype and its shape."""

    base_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class StreamedDeltas:
    params: dict[str, PrunedParam] = field(default_factory=dict)
    masks: list[dict[str, Kept]] = field(default_factory=list)  # one per mask seed, masks[0] is written
    dense: dict[str, DenseParam] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    sums: dict[str, RowSums] = field(default_factory=dict)  # Linear layer -> Algorithm 3 row sums
    stats: DeltaStats = field(default_factory=DeltaStats)

    @property
    def base_names(self) -> dict[str, str]:
        return {n: p.base_name for n, p in self.params.items()}


def stream_deltas(
    base: ModelDir,
    finetune: ModelDir,
    alignment: Alignment,
    method: PruningMethod,
    density: float,
    seeds: Sequence[int],
    *,
    keep_dense: Sequence[re.Pattern[str]] = (),
    prune_scope: str = "all",
    inputs: Mapping[str, InputStats] | None = None,
    row_sums: bool = False,
    delta_stats: bool = False,
    quiet: bool = True,
) -> StreamedDeltas:
    """Prune every delta with `method` once per seed in `seeds`.

    inputs (Linear module name -> calibration input statistics) feed WANDA's ‖X_j‖₂ and, with row_sums,
    Algorithm 3's x̄_j; delta_stats accumulates |δ| and |θ_B| statistics for `auto`.
    """
    out = StreamedDeltas(masks=[{} for _ in seeds])
    inputs = inputs or {}
    names = finetune.names()
    for pd in progress(
        iter_param_deltas(base, finetune, alignment, keep_dense=keep_dense, prune_scope=prune_scope),
        total=len(names),
        desc="diffing",
        quiet=quiet,
    ):
        if pd.kind == "unchanged":
            out.unchanged.append(pd.name)
            continue
        if pd.kind == "dense":
            if pd.value is None:
                raise ValueError(f"{pd.name}: a dense parameter without a value")
            out.dense[pd.name] = DenseParam(pd.value)
            continue
        if pd.delta is None:
            raise ValueError(f"{pd.name}: a pruned parameter without a delta")
        delta = pd.delta
        out.params[pd.name] = PrunedParam(pd.base_name, pd.dtype, pd.shape)
        layer, part = _layer_of(pd.name)
        stats = inputs.get(layer)
        norm = stats.norm if stats is not None and part == "weight" else None
        flat = delta.reshape(-1)
        for kept, seed in zip(out.masks, seeds, strict=True):
            idx = method.keep_indices(delta, density, seed, pd.name, input_norm=norm)
            kept[pd.name] = Kept(idx, flat[idx].clone())
        if row_sums and stats is not None:
            _add_row_sums(out.sums, layer, part, delta, stats)
        if delta_stats:
            out.stats.add_(delta, base.get_tensor(pd.base_name))
    return out


def _layer_of(name: str) -> tuple[str, str]:
    layer, _, part = name.rpartition(".")
    return layer, part


def _add_row_sums(
    sums: dict[str, RowSums], layer: str, part: str, delta: torch.Tensor, x: InputStats
) -> None:
    if part == "weight" and delta.dim() == 2 and delta.shape[1] == x.mean.numel():
        sums.setdefault(layer, RowSums.zeros(delta.shape[0])).add_weight_(delta, x.mean)
    elif part == "bias" and delta.dim() == 1:
        sums.setdefault(layer, RowSums.zeros(delta.shape[0])).add_bias_(delta)
