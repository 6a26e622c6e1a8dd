"""LoRA input: a PEFT adapter materialises to exactly PEFT's merged weights and compresses like any delta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltas_store.apply import apply_to_dir
from deltas_store.checkpoint import ModelDir
from deltas_store.compression.pipeline import CompressOptions, compress
from deltas_store.errors import AdapterError
from deltas_store.format.io import read_manifest
from deltas_store.lora import LoraFinetune, is_adapter_dir, lora_delta, open_finetune, pattern_value

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapter(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter on the tiny Llama (rank/alpha patterns, an embedding target, rsLoRA off), with
    random B so that it actually changes the weights; and PEFT's own merge_and_unload weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 32},
        lora_dropout=0.0,
    )
    wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = tmp_path_factory.mktemp("adapters") / "tiny-lora"
    wrapped.save_pretrained(out, safe_serialization=True)
    merged = {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    return out, merged


def test_materialisation_equals_peft_merge_and_unload(
    tiny_llama_dir: Path, adapter: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, merged = adapter
    assert is_adapter_dir(path)
    with ModelDir.open(tiny_llama_dir) as base, LoraFinetune.open_adapter(path, base) as ft:
        assert set(ft.targets) >= {
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.embed_tokens.weight",
        }
        changed = 0
        for name in base.names():
            got = ft.get_tensor(name)
            assert torch.equal(got, merged[name]), name
            changed += not torch.equal(got, base.get_tensor(name))
        assert changed == len(ft.targets) == 2 * 3 + 1


def test_lora_compresses_like_any_delta(
    tiny_llama_dir: Path, adapter: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, merged = adapter
    # No pruning (p = 0, DARE scale 1): base + delta is PEFT's merged model, up to float32 rounding.
    r = compress(
        CompressOptions(tiny_llama_dir, path, tmp_path / "full.safetensors", method="dare", drop_rate=0.0)
    )
    m = r.manifest
    assert m.finetune_id == "tiny-lora" and len(m.params) == 7 and len(m.unchanged) > 0
    assert all(e.kind == "sparse" for e in m.params.values())
    applied = load_file(apply_to_dir(tiny_llama_dir, r.path, tmp_path / "out") / "model.safetensors")
    for name, w in applied.items():
        torch.testing.assert_close(w, merged[name], rtol=0, atol=1e-6)
    # DAREx-q applies unchanged, with the label-free search on the merged model.
    r2 = compress(
        CompressOptions(
            tiny_llama_dir,
            path,
            tmp_path / "x.safetensors",
            drop_rate=0.9,
            calibration_samples=2,
            calibration_tokens=16,
        )
    )
    assert r2.manifest.calibration is not None and 0.1 <= r2.manifest.q <= 1.0  # type: ignore[operator]
    assert set(r2.manifest.params) == set(m.params)


def test_fan_in_fan_out_patterns_and_refusals(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    assert torch.equal(lora_delta(a, b, 0.5, fan_in_fan_out=True), (b @ a).T * 0.5)
    assert pattern_value({"down_proj": 2}, "model.layers.0.mlp.down_proj", 8) == 2
    assert pattern_value({"layers.1.mlp": 2}, "model.layers.11.mlp", 8) == 8
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "use_dora": true, "r": 2, "lora_alpha": 4}'
    )
    (dora / "adapter_model.safetensors").write_bytes(b"")
    with ModelDir.open(tiny_llama_dir) as base, pytest.raises(AdapterError, match="DoRA"):
        open_finetune(dora, base)


def test_cli_compresses_an_adapter_directory(
    capsys: pytest.CaptureFixture[str],
    tiny_llama_dir: Path,
    adapter: tuple[Path, dict[str, torch.Tensor]],
    tmp_path: Path,
) -> None:
    from client.cli import main

    out = tmp_path / "lora.safetensors"
    rc = main(
        ["compress", str(tiny_llama_dir), str(adapter[0]), "-o", str(out), "--method", "dare", "--quiet"]
    )
    assert rc == 0, capsys.readouterr().err
    m = read_manifest(out)
    assert m.finetune_id == "tiny-lora" and m.method == "dare" and len(m.params) == 7
