"""One flat buffer behind every resident parameter, so a delta patches the whole model in one scatter."""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

_ALIGN_BYTES = 64  # every parameter starts on a cache line, as a separately allocated tensor would
_HUGE_PAGE = 2 << 20  # x86-64's (and arm64's with 4 KiB pages) transparent huge page
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux


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


def _madvise_huge(address: int, length: int) -> bool:
    """Ask Linux to back [address, address + length) with transparent huge pages; False where it cannot."""
    if not sys.platform.startswith("linux") or length <= 0:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return bool(libc.madvise(address, length, _MADV_HUGEPAGE) == 0)
    except (OSError, AttributeError):
        return False


def host_zeros(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """A zeroed 1-D host tensor, backed by transparent huge pages where the OS offers them; (tensor, advised).

    A swap writes a few values into each of many weight lines spread over the whole model: with 4 KiB pages
    nearly every run of kept values also misses the TLB (bench/results/swap*.md: block-mask swaps took
    1.3-2.3x longer on them). The memory is allocated untouched, aligned to a huge page, advised (Linux
    `MADV_HUGEPAGE`, honoured in the default `madvise` THP mode), and only then zeroed, so the first touch
    faults in huge pages. Elsewhere, or under 2 MiB, an ordinary tensor.
    """
    size = torch.empty(0, dtype=dtype).element_size()
    nbytes = numel * size
    if nbytes < _HUGE_PAGE or not sys.platform.startswith("linux"):
        return torch.zeros(numel, dtype=dtype), False
    raw = torch.empty(nbytes + _HUGE_PAGE, dtype=torch.uint8)  # large: mmap'd, not yet touched
    skip = -raw.data_ptr() % _HUGE_PAGE
    region = raw[skip : skip + nbytes]
    advised = _madvise_huge(region.data_ptr(), nbytes // mmap.PAGESIZE * mmap.PAGESIZE)  # whole pages of ours
    tensor = region.view(dtype)
    tensor.zero_()
    return tensor, advised


def host_clone(tensor: torch.Tensor) -> torch.Tensor:
    """A flat host copy of `tensor` in memory from `host_zeros` (huge pages where offered)."""
    copy, _ = host_zeros(tensor.numel(), tensor.dtype)
    copy.copy_(tensor.reshape(-1))
    return copy


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
    host, _ = host_zeros(total, dtype)  # on CPU it stays the resident buffer (`.to` returns it as is)
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
