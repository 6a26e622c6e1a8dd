"""LoRA input: a PEFT adapter directory read as a fine-tune, base + B·A·(α/r) per target matrix.

`deltaserve compress BASE ADAPTER_DIR` sees the adapter through `LoraFinetune`, a read-only ModelDir whose
target weights are materialised exactly as PEFT's `merge_and_unload` computes them; every other tensor is the
base's (and so costs nothing in the delta). The delta is then pruned like any other (DAREx-q applies unchanged).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from deltas_store.checkpoint import ModelDir, TensorInfo
from deltas_store.errors import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$"
)


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory: adapter_config.json beside adapter_model.safetensors."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and (Path(path) / ADAPTER_WEIGHTS).is_file()


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """B·A·scaling in float32, transposed for fan_in_fan_out layers (GPT-2 Conv1D, embeddings).

    a: (r, in), b: (out, r). Same operation order as PEFT's `get_delta_weight`, so merges agree bit for bit.
    """
    delta = b.float() @ a.float()  # (out, in)
    if fan_in_fan_out:
        delta = delta.T
    return delta * scaling


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraTarget:
    """One materialised adapter update: `delta` is added to base tensor `name`."""

    name: str
    delta: torch.Tensor  # float32, the base tensor's shape


def read_adapter(path: Path, base: ModelDir) -> tuple[dict[str, LoraTarget], dict[str, torch.Tensor]]:
    """The adapter's updates keyed by base tensor name, and its whole tensors (modules_to_save)."""
    config = _read_config(path)
    try:
        tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{path}: unreadable {ADAPTER_WEIGHTS} ({exc})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        m = _LORA_KEY.match(name)
        if m is None:
            # A target's own weight saved beside its factors (e.g. a LoRA'd embedding): `X.base_layer.weight`.
            whole[name.replace(".base_layer.", ".")] = tensor
        else:
            parts.setdefault(m["module"], {})[m["part"]] = tensor
    targets: dict[str, LoraTarget] = {}
    for module, p in sorted(parts.items()):
        for target in _module_targets(path, config, module, p, base, whole):
            targets[target.name] = target
    return targets, whole


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: unreadable {ADAPTER_CONFIG} ({exc})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{path}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters are not supported (their update is not B·A·α/r)")
    return config


def _module_targets(
    path: Path,
    config: dict[str, Any],
    module: str,
    p: dict[str, torch.Tensor],
    base: ModelDir,
    whole: Mapping[str, torch.Tensor],
) -> list[LoraTarget]:
    embedding = "lora_embedding_A" in p
    a = p.get("lora_embedding_A" if embedding else "lora_A.weight")
    b = p.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{path}: {module} needs matching LoRA A (r, in) and B (out, r) matrices")
    rank = int(a.shape[0])
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    transpose = embedding or bool(config.get("fan_in_fan_out"))
    weight = f"{module}.weight" if f"{module}.weight" in whole else _base_name(base, f"{module}.weight", path)
    delta = lora_delta(a, b, scaling, transpose)
    shape = tuple(whole[weight].shape) if weight in whole else base.info(weight).shape
    if shape != tuple(delta.shape):
        raise AdapterError(f"{path}: {module} updates shape {tuple(delta.shape)}, the weight has {shape}")
    out = [LoraTarget(weight, delta)]
    if "lora_B.bias" in p:  # lora_bias=True: B's bias, scaled, is added to the base layer's bias
        out.append(LoraTarget(_base_name(base, f"{module}.bias", path), p["lora_B.bias"].float() * scaling))
    return out


def _base_name(base: ModelDir, name: str, path: Path) -> str:
    if name in base:
        return name
    if "." in name and name.split(".", 1)[1] in base:  # e.g. `bert.` on the adapter side, a bare base
        return name.split(".", 1)[1]
    raise AdapterError(f"{path}: the adapter targets {name}, which the base model does not have")


class LoraFinetune(ModelDir):
    """A base model directory plus a PEFT LoRA adapter, read as the merged fine-tune.

    Example::

        with ModelDir.open("models/base") as base, LoraFinetune.open_adapter("adapters/math", base) as ft:
            ft.get_tensor("model.layers.0.self_attn.q_proj.weight")  # base + B·A·α/r
    """

    def __init__(
        self, path: Path, base: ModelDir, targets: dict[str, LoraTarget], whole: dict[str, torch.Tensor]
    ):
        super().__init__(path, dict(base.config), {})
        self.base = base
        self.targets = targets
        self.whole = whole

    @classmethod
    def open_adapter(cls, path: str | Path, base: ModelDir) -> LoraFinetune:
        path = Path(path)
        if not is_adapter_dir(path):
            raise AdapterError(f"{path}: not a PEFT adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
        targets, whole = read_adapter(path, base)
        return cls(path, base, targets, whole)

    @property
    def model_id(self) -> str:
        return self.path.resolve().name

    def changed(self) -> list[str]:
        """The tensors that differ from the base model's: LoRA targets and whole (modules_to_save) tensors."""
        return sorted(set(self.targets) | set(self.whole))

    def names(self) -> list[str]:
        return sorted(set(self.base.names()) | set(self.whole))

    def __contains__(self, name: object) -> bool:
        return name in self.whole or name in self.base

    def info(self, name: str) -> TensorInfo:
        if name in self.whole:
            t = self.whole[name]
            return TensorInfo(tuple(t.shape), str(t.dtype))
        return self.base.info(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        weight = self.whole[name] if name in self.whole else self.base.get_tensor(name)
        target = self.targets.get(name)
        if target is None:
            return weight
        return (weight.float() + target.delta).to(weight.dtype)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get_tensor(name)[start:stop]

    def safetensors_bytes(self) -> int:
        """The merged fine-tune's size: the base's (the adapter adds no tensors to a merged model)."""
        return self.base.safetensors_bytes()


def open_finetune(path: str | Path, base: ModelDir) -> ModelDir:
    """A fine-tune as a ModelDir: a Hugging Face model directory, or a PEFT adapter on `base`."""
    if is_adapter_dir(Path(path)) and not (Path(path) / "config.json").is_file():
        return LoraFinetune.open_adapter(path, base)
    return ModelDir.open(path)
