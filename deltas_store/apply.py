"""`deltaserve apply`: write base + delta as a loadable Hugging Face model directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltas_store.checkpoint import ModelDir, tokenizer_files
from deltas_store.errors import ArchitectureMismatchError, ModelDirError
from deltas_store.fingerprint import base_fingerprint
from deltas_store.format.io import Delta, read_delta
from deltas_store.patching import check_base, patched
from deltas_store.progress import progress

_SHARD_BYTES = 4 * 1024**3


def materialize(base: ModelDir, delta: Delta, *, quiet: bool = True) -> dict[str, torch.Tensor]:
    """Every fine-tune parameter as base + delta, in the base's on-disk dtype (dense ones as stored)."""
    manifest = delta.manifest
    names = sorted(set(manifest.params) | set(manifest.unchanged))
    out: dict[str, torch.Tensor] = {}
    for name in progress(names, total=len(names), desc="applying", quiet=quiet):
        if name in delta.dense:
            out[name] = delta.dense[name].value
            continue
        base_name = manifest.base_name(name)
        if base_name not in base:
            raise ArchitectureMismatchError(f"the base has no tensor {base_name} that the delta needs")
        weight = base.get_tensor(base_name)
        sp = delta.sparse.get(name)
        if sp is None:
            out[name] = weight
            continue
        if tuple(weight.shape) != tuple(sp.shape):
            raise ArchitectureMismatchError(
                f"{name}: delta shape {sp.shape}, base shape {tuple(weight.shape)}"
            )
        out[name] = patched(weight, sp.indices, sp.values)
    return out


def apply_to_dir(base_dir: Path, delta_path: Path, out_dir: Path, *, quiet: bool = True) -> Path:
    """Write base + delta to out_dir (config of the fine-tune, tokenizer of the base), atomically.

    Example::

        apply_to_dir(Path("models/base"), Path("deltas/math.safetensors"), Path("models/math"))
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelDirError(f"{out_dir}: output path exists and is not an empty directory")
    delta = read_delta(delta_path)
    with ModelDir.open(base_dir) as base:
        check_base(delta.manifest, base_fingerprint(base))
        tensors = materialize(base, delta, quiet=quiet)
        config = dict(delta.manifest.finetune_config or base.config)
        tokenizer = tokenizer_files(base.path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_weights(tensors, staging)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in tokenizer:
            shutil.copy2(file, staging / file.name)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _write_weights(tensors: dict[str, torch.Tensor], out: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        if size and size + t.nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
