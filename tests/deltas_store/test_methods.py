"""The method suite: DAREx-q with q = k is DARE, WANDA's per-row top-k, labeled and seed-averaged q search."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltas_store import calibration as cal
from deltas_store.compression.pipeline import CompressOptions, compress
from deltas_store.compression.qsearch import robust_mean, search_q
from deltas_store.compression.sparsify import wanda_keep_indices
from deltas_store.format.io import read_delta

# Small calibration batches keep these tests fast on a shared CPU.
FAST = {"calibration_samples": 2, "calibration_tokens": 16}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_q_equal_density_reproduces_dare_exactly(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    ft, p = tiny_llama_finetunes["ft-1"], 0.9
    dare = read_delta(
        compress(
            CompressOptions(tiny_llama_dir, ft, tmp_path / "dare.safetensors", method="dare", drop_rate=p)
        ).path
    )
    darex = read_delta(
        compress(
            CompressOptions(
                tiny_llama_dir, ft, tmp_path / "x.safetensors", method="darex-q", drop_rate=p, q=1 - p
            )
        ).path
    )
    assert set(dare.sparse) == set(darex.sparse)
    for name, sp in dare.sparse.items():
        assert torch.equal(sp.indices, darex.sparse[name].indices), name
        assert torch.equal(sp.values, darex.sparse[name].values), name
        assert dare.manifest.params[name].scale == darex.manifest.params[name].scale


@pytest.mark.parametrize("method", ["dare", "darex-q"])
def test_block_mask_compresses_to_whole_runs_and_round_trips(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path, method: str
) -> None:
    from deltas_store.apply import materialize
    from deltas_store.checkpoint import ModelDir

    ft, p = tiny_llama_finetunes["ft-1"], 0.9
    r = compress(
        CompressOptions(
            tiny_llama_dir, ft, tmp_path / "b.safetensors", method=method, drop_rate=p, mask_block=16,
            q=0.2 if method == "darex-q" else None,
        )
    )  # fmt: skip
    sparse = [e for e in r.manifest.params.values() if e.kind == "sparse"]
    assert sparse and all(e.encoding == "seeded_blocks" and e.block == 16 for e in sparse)
    delta = read_delta(r.path)
    base, finetuned = _weights(tiny_llama_dir), _weights(ft)
    for name, sp in delta.sparse.items():
        assert sp.indices.numel() % 16 == 0  # tiny-llama rows are multiples of 16: no partial block
        runs = sp.indices.view(-1, 16)
        assert bool((runs[:, 0] % 16 == 0).all())  # each run starts on a block boundary ...
        assert bool((runs - runs[:, :1] == torch.arange(16)).all())  # ... and is 16 consecutive entries
        scale = 1 / (1 - p) if method == "dare" else 1 / 0.2
        true_delta = (finetuned[name].float() - base[name].float()).flatten()
        assert torch.allclose(sp.values.float(), true_delta[sp.indices] * scale, atol=1e-6)
    # the materialised model is base + the stored values, in place
    with ModelDir.open(tiny_llama_dir) as b:
        merged = materialize(b, delta)
    name, sp = next(iter(delta.sparse.items()))
    want = base[name].float().flatten().clone()
    want[sp.indices] += sp.values.float()
    assert torch.allclose(merged[name].float().flatten(), want, atol=1e-6)


def test_block_mask_rejects_importance_methods(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mask block applies to random masks"):
        compress(
            CompressOptions(tiny_llama_dir, tiny_llama_dir, tmp_path / "m.safetensors", method="magnitude",
                            mask_block=16)
        )  # fmt: skip
    assert not (tmp_path / "m.safetensors").exists()


def test_wanda_keeps_top_k_per_row_by_score() -> None:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 40, generator=gen)
    norm = torch.rand(40, generator=gen) * 3
    idx = wanda_keep_indices(delta, norm, density=0.25)
    score = (delta.abs() * norm).reshape(-1)
    kept = torch.zeros(240, dtype=torch.bool)
    kept[idx] = True
    for row in range(6):
        row_kept, row_score = kept[row * 40 : (row + 1) * 40], score[row * 40 : (row + 1) * 40]
        assert int(row_kept.sum()) == 10
        assert float(row_score[row_kept].min()) >= float(row_score[~row_kept].max())
    # The norm matters: with a flat norm, wanda is per-row magnitude.
    flat = wanda_keep_indices(delta, torch.ones(40), 0.25)
    assert not torch.equal(flat, idx)


def test_wanda_compress_uses_finetune_calibration_activations(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    ft = tiny_llama_finetunes["ft-0"]
    r = compress(
        CompressOptions(
            tiny_llama_dir, ft, tmp_path / "w.safetensors", method="wanda", drop_rate=0.75, **FAST
        )
    )
    delta = read_delta(r.path)
    # The same calibration batch through the fine-tune, with the recorder, gives the norms WANDA used.
    model = cal.load_model_fp32(ft, {"architectures": ["LlamaForCausalLM"]})
    texts, _ = cal.load_texts(None)
    batch = cal.tokenize(ft, tiny_llama_dir, texts[: FAST["calibration_samples"]], FAST["calibration_tokens"])
    with cal.LinearInputRecorder(model, batch["attention_mask"]) as rec:
        model(**batch)
    base, tuned = _weights(tiny_llama_dir), _weights(ft)
    name = "model.layers.1.mlp.down_proj.weight"
    d = tuned[name].float() - base[name].float()
    expected = wanda_keep_indices(d, rec.stats["model.layers.1.mlp.down_proj"].norm.float(), 0.25)
    assert torch.equal(delta.sparse[name].indices, expected)
    assert r.manifest.params[name].encoding == "varint_gaps" and r.manifest.params[name].scale == 1.0
    # Tensors without a Linear input (norms, embeddings) fall back to magnitude.
    norm_name = "model.norm.weight"
    dn = (tuned[norm_name].float() - base[norm_name].float()).abs()
    assert torch.equal(
        delta.sparse[norm_name].indices, torch.sort(torch.topk(dn, round(0.25 * dn.numel())).indices).values
    )


def test_search_q_maximises_for_a_metric() -> None:
    result = search_q(lambda q: -((q - 0.42) ** 2), density=0.1, goal="max")
    assert abs(result.q - 0.42) <= 0.0026
    assert result.score == max(s for _, s in result.grid)


def test_robust_mean_drops_the_outlier_seed() -> None:
    assert robust_mean([1.0, 1.2, 0.8, 9.0]) == pytest.approx(1.0)
    assert robust_mean([1.0, 3.0]) == 2.0
    assert robust_mean([5.0]) == 5.0


def test_labeled_q_search_maximises_a_user_metric(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    """A metric whose maximum is known (q* = 0.4): the search must land on it and report it."""
    ft = tiny_llama_finetunes["ft-1"]
    name = "model.layers.0.self_attn.q_proj.weight"
    base_w = _weights(tiny_llama_dir)[name].reshape(-1)
    delta = _weights(ft)[name].reshape(-1) - base_w

    def closeness_to_q04(model: torch.nn.Module) -> float:
        w = dict(model.named_parameters())[name].detach().reshape(-1)
        moved = torch.nonzero(w != base_w).flatten()  # the kept entries: base + delta / q
        return -float(((w[moved] - base_w[moved]) - delta[moved] / 0.4).pow(2).sum())

    r = compress(
        CompressOptions(
            tiny_llama_dir, ft, tmp_path / "l.safetensors", drop_rate=0.9, metric=closeness_to_q04, **FAST
        )
    )
    cal_ = r.manifest.calibration
    assert cal_ is not None and cal_.metric == "closeness_to_q04" and cal_.details["goal"] == "max"
    assert r.manifest.q == pytest.approx(0.4, abs=0.0026)
    assert cal_.score == max(s for _, s in cal_.grid)


def test_q_search_averages_over_mask_seeds(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    ft = tiny_llama_finetunes["ft-2"]
    r = compress(
        CompressOptions(
            tiny_llama_dir, ft, tmp_path / "s.safetensors", drop_rate=0.9, mask_seeds=4, seed=3, **FAST
        )
    )
    cal_ = r.manifest.calibration
    assert cal_ is not None and cal_.details["mask_seeds"] == 4
    per_seed = {q: scores for q, scores in cal_.details["per_seed"]}
    assert all(len(s) == 4 for s in per_seed.values())
    for q, score in cal_.grid:  # each grid score is the seed mean with the outlier dropped
        assert score == pytest.approx(robust_mean(per_seed[q]))
    # The file holds the mask of --seed itself, which any reader regenerates.
    seed3 = read_delta(r.path)
    assert r.manifest.seed == 3 and all(e.encoding == "seeded" for e in r.manifest.params.values())
    assert seed3.sparse


def test_validation_jsonl_labeled_metric(tmp_path: Path) -> None:
    from deltas_store.errors import CalibrationError
    from deltas_store.validation import load_validation

    good = tmp_path / "v.jsonl"
    good.write_text('{"text": "great film", "label": 1}\n\n{"text": "dull", "label": 0}\n')
    data = load_validation(good)
    assert data.kind == "classification" and data.targets == (1, 0) and data.metric_name == "accuracy"
    gen = tmp_path / "g.jsonl"
    gen.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    assert load_validation(gen).metric_name == "exact_match"
    mixed = tmp_path / "m.jsonl"
    mixed.write_text('{"text": "a", "label": 1}\n{"prompt": "b", "answer": "c"}\n')
    with pytest.raises(CalibrationError, match="mixes"):
        load_validation(mixed)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n')
    with pytest.raises(CalibrationError, match=":1:"):
        load_validation(bad)
