"""Loading the resident base model and its tokenizer, on the configured device and dtype."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from server.engine.packing import FlatWeights, pack_parameters_
from server.settings import Device, DType

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    """The base model in eval mode with frozen weights, its tokenizer, and where it lives."""

    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer (fast or slow); typed loosely across versions
    device: torch.device
    dtype: torch.dtype
    flat: FlatWeights | None = None  # every parameter viewed from one buffer (None: mixed dtypes)


def resolve_device(device: Device) -> torch.device:
    """`auto` = cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: DType, base: Path) -> torch.dtype:
    """`auto` = the dtype the checkpoint's config declares (float32 when it declares none)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    config = json.loads((base / "config.json").read_text())
    declared = config.get("dtype") or config.get("torch_dtype")
    return _DTYPES.get(str(declared), torch.float32)


def load_model(base: Path, device: Device, dtype: DType) -> LoadedModel:
    """Load the base once; parameters are frozen (no autograd), packed into one buffer, and patched in place."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, base)
    # transformers 5 renamed `torch_dtype` to `dtype`.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(base, **{dtype_kw: torch_dtype})
    flat = pack_parameters_(model, torch_device)  # one buffer: a swap is one gather + one scatter
    torch.nn.Module.to(model, torch_device)  # in place; PreTrainedModel.to's typing is narrower
    torch.nn.Module.eval(model)
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    return LoadedModel(model, tokenizer, torch_device, torch_dtype, flat)
