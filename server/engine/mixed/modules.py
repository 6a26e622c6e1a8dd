"""Which resident parameters a mixed batch can serve as side terms, and through which modules."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ParamUses:
    """Resident parameter name -> the modules that use it in a way a side term can reproduce.

    A delta that changes any parameter missing from these maps (a Linear bias, a LayerNorm with a bias,
    a scaled embedding) cannot join a mixed batch; the scheduler serves it merged.
    """

    shapes: Mapping[str, torch.Size]
    linears: Mapping[str, tuple[nn.Linear, ...]] = field(default_factory=dict)  # weight (out, in)
    embeddings: Mapping[str, tuple[nn.Embedding, ...]] = field(default_factory=dict)  # weight (V, H)
    norms: Mapping[str, tuple[nn.Module, ...]] = field(
        default_factory=dict
    )  # weight (H,), out = weight * g(x)

    def supports(self, name: str) -> bool:
        return name in self.linears or name in self.embeddings or name in self.norms


def find_param_uses(model: nn.Module) -> ParamUses:
    """Classify every module of `model` by the parameter it reads (tied weights: every module that reads it)."""
    names = {id(p): name for name, p in model.named_parameters()}
    linears: dict[str, list[nn.Linear]] = {}
    embeddings: dict[str, list[nn.Embedding]] = {}
    norms: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
            linears.setdefault(names[id(module.weight)], []).append(module)
        elif type(module).forward is nn.Embedding.forward and isinstance(module, nn.Embedding):
            if module.max_norm is None:
                embeddings.setdefault(names[id(module.weight)], []).append(module)
        elif set(own) == {"weight"} and own["weight"].dim() == 1 and _scales_rows(module, own["weight"]):
            norms.setdefault(names[id(own["weight"])], []).append(module)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return ParamUses(
        shapes,
        {k: tuple(v) for k, v in linears.items()},
        {k: tuple(v) for k, v in embeddings.items()},
        {k: tuple(v) for k, v in norms.items()},
    )


def _scales_rows(module: nn.Module, weight: torch.Tensor) -> bool:
    """Whether a (B, 1, H) stack of weights gives each row of `x` (B, T, H) exactly the output the module
    gives with that row's weight alone (true of RMSNorm-like ``weight * g(x)``), probed bit for bit.

    A mixed batch then swaps such a stack of per-row patched weights in for the batch's duration.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, weight.numel()), generator=gen).to(weight)
    rows = torch.randn((2, 1, weight.numel()), generator=gen).to(weight)  # (B, 1, H) two different weights
    try:
        with torch.no_grad():
            stacked = _with_weight(module, rows).forward(x)
            each = [_with_weight(module, rows[b, 0]).forward(x[b : b + 1]) for b in range(2)]
            same = _with_weight(module, weight).forward(x)
            return torch.equal(stacked, torch.cat(each)) and torch.equal(same, module.forward(x))
    except (RuntimeError, TypeError, ValueError, IndexError):  # not a (B, T, H) -> (B, T, H) module
        return False


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A shallow copy of `module` reading `weight` instead (hooks are bypassed: only `.forward` is called)."""
    twin = copy.copy(module)
    twin._parameters = {"weight": weight}  # type: ignore[dict-item]
    return twin
