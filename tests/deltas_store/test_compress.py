"""compress + apply: the weights equal base + the expected pruned, rescaled delta, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltas_store.apply import apply_to_dir
from deltas_store.compression.pipeline import CompressOptions, compress
from deltas_store.compression.sparsify import seeded_keep_indices
from deltas_store.format.io import read_delta
from tests.models import cast_dir, perturb


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _expected(base: torch.Tensor, ft: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    delta = ft.float().reshape(-1) - base.float().reshape(-1)
    out = base.clone().reshape(-1)
    out[idx] = out[idx] + (delta[idx] * scale).to(base.dtype)
    return out.reshape(base.shape)


@pytest.mark.parametrize(("method", "q"), [("dare", None), ("darex-q", 0.3), ("darex-q", None)])
def test_random_methods_apply_exactly(
    method: str, q: float | None, tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    ft_dir = tiny_llama_finetunes["ft-1"]
    p = 0.9
    result = compress(
        CompressOptions(
            tiny_llama_dir, ft_dir, tmp_path / "d.safetensors", method=method, drop_rate=p, q=q, seed=7
        )
    )
    m = result.manifest
    scale = 1 / (1 - p) if method == "dare" else 1 / m.q  # type: ignore[operator]
    if q is not None:
        assert m.q == q
    if method == "darex-q" and q is None:
        assert m.calibration is not None and m.calibration.score is not None and len(m.calibration.grid) > 3
        assert (1 - p) <= m.q <= 1.0  # type: ignore[operator]
    out = apply_to_dir(tiny_llama_dir, result.path, tmp_path / "applied")
    base, ft, applied = _weights(tiny_llama_dir), _weights(ft_dir), _weights(out)
    assert set(applied) == set(ft)
    for name, w in applied.items():
        idx = seeded_keep_indices(w.numel(), 1 - p, 7, name)
        assert torch.equal(w, _expected(base[name], ft[name], idx, scale)), name


def test_magnitude_keeps_largest_unscaled(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    ft_dir = tiny_llama_finetunes["ft-0"]
    r = compress(
        CompressOptions(tiny_llama_dir, ft_dir, tmp_path / "m.safetensors", method="magnitude", drop_rate=0.9)
    )
    base, ft = _weights(tiny_llama_dir), _weights(ft_dir)
    applied = _weights(apply_to_dir(tiny_llama_dir, r.path, tmp_path / "out"))
    for name, w in applied.items():
        delta = (ft[name].float() - base[name].float()).reshape(-1)
        k = round(0.1 * delta.numel())
        idx = torch.sort(torch.topk(delta.abs(), k).indices).values
        assert torch.equal(w, _expected(base[name], ft[name], idx, 1.0)), name
    assert all(e.encoding == "varint_gaps" for e in r.manifest.params.values())


def test_bf16_values_and_exact_apply(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base_dir = cast_dir(tiny_llama_dir, tmp_path / "base16", torch.bfloat16)
    ft_dir = perturb(base_dir, tmp_path / "ft16", scale=0.1, seed=3)
    r = compress(CompressOptions(base_dir, ft_dir, tmp_path / "d.safetensors", method="dare", drop_rate=0.5))
    assert r.manifest.value_dtype == "bfloat16"
    base, ft = _weights(base_dir), _weights(ft_dir)
    applied = _weights(apply_to_dir(base_dir, r.path, tmp_path / "out"))
    for name, w in applied.items():
        assert w.dtype == torch.bfloat16
        idx = seeded_keep_indices(w.numel(), 0.5, 0, name)
        assert torch.equal(w, _expected(base[name], ft[name], idx, 2.0)), name


def test_same_seed_same_file_content(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    ft = tiny_llama_finetunes["ft-2"]
    a = read_delta(
        compress(CompressOptions(tiny_llama_dir, ft, tmp_path / "a.safetensors", method="dare", seed=5)).path
    )
    b = read_delta(
        compress(CompressOptions(tiny_llama_dir, ft, tmp_path / "b.safetensors", method="dare", seed=5)).path
    )
    c = read_delta(
        compress(CompressOptions(tiny_llama_dir, ft, tmp_path / "c.safetensors", method="dare", seed=6)).path
    )
    for name, sp in a.sparse.items():
        assert torch.equal(sp.indices, b.sparse[name].indices) and torch.equal(
            sp.values, b.sparse[name].values
        )
    assert any(not torch.equal(sp.indices, c.sparse[n].indices) for n, sp in a.sparse.items())


def test_unchanged_tensors_are_free_and_keep_dense(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ft_dir = perturb(tiny_llama_dir, tmp_path / "ft", scale=0.1, seed=1, skip=("layers.1.",))
    r = compress(
        CompressOptions(
            tiny_llama_dir, ft_dir, tmp_path / "d.safetensors", method="dare", keep_dense=(r"norm\.weight$",)
        )
    )
    m = r.manifest
    assert m.unchanged and all("layers.1." in n for n in m.unchanged)
    assert not any(n in m.params for n in m.unchanged)
    dense = {n for n, e in m.params.items() if e.kind == "dense"}
    assert dense and all(n.endswith("norm.weight") for n in dense)
    applied = _weights(apply_to_dir(tiny_llama_dir, r.path, tmp_path / "out"))
    ft = _weights(ft_dir)
    for n in dense | set(m.unchanged):
        assert torch.equal(applied[n], ft[n])


def test_attn_mlp_scope_keeps_embeddings_dense(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    r = compress(
        CompressOptions(
            tiny_llama_dir,
            tiny_llama_finetunes["ft-0"],
            tmp_path / "d.safetensors",
            method="dare",
            prune_scope="attn-mlp",
        )
    )
    kinds = {n: e.kind for n, e in r.manifest.params.items()}
    assert kinds["model.embed_tokens.weight"] == "dense" and kinds["lm_head.weight"] == "dense"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "sparse"


def test_bert_classifier_prefix_alignment_and_new_head(
    tiny_bert_dir: Path, tiny_bert_classifier_dir: Path, tmp_path: Path
) -> None:
    r = compress(
        CompressOptions(
            tiny_bert_dir, tiny_bert_classifier_dir, tmp_path / "d.safetensors", method="dare", q=None
        )
    )
    m = r.manifest
    assert m.finetune_prefix == "bert." and m.base_prefix == ""
    assert m.params["classifier.weight"].kind == "dense"
    assert m.params["bert.encoder.layer.0.attention.self.query.weight"].kind == "sparse"
    out = apply_to_dir(tiny_bert_dir, r.path, tmp_path / "applied")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    ft = _weights(tiny_bert_classifier_dir)
    assert torch.equal(model.classifier.weight.detach(), ft["classifier.weight"])


def test_p099_delta_is_small(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # A wider tiny model so that the manifest does not dominate: every parameter changed, bf16.
    from tests.models import write_tiny_llama

    base = cast_dir(write_tiny_llama(tmp_path / "wide", vocab_size=4096), tmp_path / "wide16", torch.bfloat16)
    ft = perturb(base, tmp_path / "ft16", scale=0.1, seed=2)
    r = compress(
        CompressOptions(base, ft, tmp_path / "d.safetensors", method="darex-q", q=0.2, drop_rate=0.99)
    )
    assert r.file_bytes <= 0.03 * r.finetuned_bytes, (r.file_bytes, r.finetuned_bytes)


def test_q_is_recorded_only_for_methods_that_rescale_by_q(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    ft = tiny_llama_finetunes["ft-0"]
    dare = compress(CompressOptions(tiny_llama_dir, ft, tmp_path / "a.safetensors", method="dare", q=0.5))
    assert dare.manifest.q is None
    assert all(e.scale == pytest.approx(1 / 0.1) for e in dare.manifest.params.values())
