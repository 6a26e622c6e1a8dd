"""Hot-swap: apply then restore is bit-exact in every dtype; bad deltas touch nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltas_store.apply import materialize
from deltas_store.checkpoint import ModelDir
from deltas_store.compression.pipeline import CompressOptions, compress
from deltas_store.errors import ArchitectureMismatchError, BaseMismatchError
from deltas_store.fingerprint import base_fingerprint
from deltas_store.format.io import SparseParam, read_delta
from deltas_store.patching import apply_delta_, check_base, prepare_delta, restore_


def _model(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_restore_bit_exact_after_many_swaps(
    dtype: torch.dtype, tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    model = _model(tiny_llama_dir, dtype)
    weights = dict(model.named_parameters())
    before = {n: w.detach().clone() for n, w in weights.items()}
    prepared = []
    for i, ft in enumerate(tiny_llama_finetunes.values()):
        path = compress(
            CompressOptions(tiny_llama_dir, ft, tmp_path / f"{i}.safetensors", method="dare")
        ).path
        prepared.append(prepare_delta(read_delta(path), weights))
    for _ in range(5):
        for p in prepared:
            saved = apply_delta_(weights, p)
            assert any(not torch.equal(weights[n], before[n]) for n in before)
            restore_(saved)
    for n, w in weights.items():
        assert torch.equal(w, before[n]), n


def test_server_arithmetic_equals_apply_command(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    path = compress(
        CompressOptions(
            tiny_llama_dir, tiny_llama_finetunes["ft-1"], tmp_path / "d.safetensors", method="darex-q", q=0.5
        )
    ).path
    delta = read_delta(path)
    model = _model(tiny_llama_dir, torch.float32)
    weights = dict(model.named_parameters())
    saved = apply_delta_(weights, prepare_delta(delta, weights))
    with ModelDir.open(tiny_llama_dir) as base:
        reference = materialize(base, delta)
    for n, w in weights.items():
        assert torch.equal(w.detach(), reference[n]), n
    restore_(saved)


def test_bad_delta_touches_nothing(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    path = compress(
        CompressOptions(
            tiny_llama_dir, tiny_llama_finetunes["ft-0"], tmp_path / "d.safetensors", method="dare"
        )
    ).path
    delta = read_delta(path)
    name = sorted(delta.sparse)[-1]
    sp = delta.sparse[name]
    bad = type(delta)(delta.manifest, {**delta.sparse, name: SparseParam((3, 3), sp.indices, sp.values)}, {})
    model = _model(tiny_llama_dir, torch.float32)
    weights = dict(model.named_parameters())
    before = {n: w.detach().clone() for n, w in weights.items()}
    with pytest.raises(ArchitectureMismatchError):
        prepare_delta(bad, weights)
    for n, w in weights.items():
        assert torch.equal(w, before[n])


def test_apply_failure_midway_restores(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    path = compress(
        CompressOptions(
            tiny_llama_dir, tiny_llama_finetunes["ft-0"], tmp_path / "d.safetensors", method="dare"
        )
    ).path
    model = _model(tiny_llama_dir, torch.float32)
    weights = dict(model.named_parameters())
    prepared = prepare_delta(read_delta(path), weights)
    before = {n: w.detach().clone() for n, w in weights.items()}
    broken = dict(weights)
    del broken[prepared.ops[-1].target]  # the last op finds no weight: KeyError after others were patched
    with pytest.raises(KeyError):
        apply_delta_(broken, prepared)
    for n, w in weights.items():
        assert torch.equal(w, before[n]), n


def test_fingerprint_catches_other_base_of_same_shape(
    tiny_llama_dir: Path, other_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    path = compress(
        CompressOptions(
            tiny_llama_dir, tiny_llama_finetunes["ft-0"], tmp_path / "d.safetensors", method="dare"
        )
    ).path
    manifest = read_delta(path).manifest
    with ModelDir.open(tiny_llama_dir) as same, ModelDir.open(other_llama_dir) as other:
        check_base(manifest, base_fingerprint(same))
        with pytest.raises(BaseMismatchError):
            check_base(manifest, base_fingerprint(other))
