"""One flat buffer behind every resident parameter, so a delta patches the whole model in one scatter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

_ALIGN_BYTES = 64  # every parameter starts on a cache line, as a separately allocated tensor would


@dataclass(frozen=True)
class FlatWeights:
    """The resident parameters as non-overlapping views of one 1-D `buffer` (one dtype, one device).

    `offsets[name]` is where parameter `name` (as `named_parameters()` names it; tied weights once) starts;
    the gaps between parameters (cache-line alignment) belong to no parameter.

    Example:
        >>> flat = pack_parameters_(model, torch.device("cpu"))  # doctest: +SKIP
        >>> flat.buffer[flat.offsets["lm_head.weight"]]  # the head's first element  # doctest: +SKIP
    """

    buffer: torch.Tensor  # (numel of all parameters,) in the model's dtype
    offsets: Mapping[str, int]
    shapes: Mapping[str, torch.Size]


def flat_layout(shapes: Mapping[str, torch.Size], dtype: torch.dtype) -> tuple[dict[str, int], int]:
    """(offset of each tensor, total elements) when `shapes` are laid end to end, each cache-line aligned."""
    align = max(_ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size(), 1)
    offsets: dict[str, int] = {}
    total = 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += -(-shape.numel() // align) * align
    return offsets, total


def pack_parameters_(model: nn.Module, device: torch.device) -> FlatWeights | None:
    """Move every parameter of `model` into one buffer on `device`, in place; None when they differ in dtype.

    The parameters stay the same `nn.Parameter` objects (modules keep their references); only their storage
    moves. Packing happens on the host, then the buffer is copied to `device` once, so the device never
    holds two copies of the model.
    """
    params = dict(model.named_parameters())
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1 or not params:
        return None
    (dtype,) = dtypes
    shapes = {name: p.shape for name, p in params.items()}
    offsets, total = flat_layout(shapes, dtype)
    host = torch.zeros(total, dtype=dtype)
    with torch.no_grad():
        for name, param in params.items():
            n = shapes[name].numel()
            host[offsets[name] : offsets[name] + n].copy_(param.detach().reshape(-1))
            param.data = torch.empty(0, dtype=dtype)  # drop the old storage before the device copy
    buffer = host.to(device)
    for name, param in params.items():
        start = offsets[name]
        param.data = buffer[start : start + shapes[name].numel()].view(shapes[name])
    return FlatWeights(buffer, offsets, shapes)
