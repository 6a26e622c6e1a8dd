"""Shared fixtures: tiny random models as real Hugging Face directories, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models import perturb, write_tiny_bert, write_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM (fp32) with a byte-level BPE tokenizer and a chat template."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_finetunes(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three 'fine-tunes' of tiny_llama_dir: every weight changed, by different amounts."""
    root = tmp_path_factory.mktemp("finetunes")
    return {
        f"ft-{i}": perturb(tiny_llama_dir, root / f"ft-{i}", scale=scale, seed=100 + i)
        for i, scale in enumerate((0.05, 0.1, 0.2))
    }


@pytest.fixture(scope="session")
def other_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and shapes as tiny_llama_dir, different weights: a wrong base."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "other-llama", seed=7)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare tiny BertModel (the base of an encoder fine-tune)."""
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_bert_classifier_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertForSequenceClassification 'fine-tune' of tiny_bert_dir: `bert.` prefix plus a new head."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import BertForSequenceClassification

    out = tmp_path_factory.mktemp("finetunes") / "tiny-bert-cls"
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model.save_pretrained(out, safe_serialization=True)
    gen = torch.Generator().manual_seed(5)
    file = out / "model.safetensors"
    tensors = load_file(file)
    for name, t in tensors.items():
        if name.startswith("bert."):
            tensors[name] = t + torch.randn(t.shape, generator=gen) * 0.02
    save_file(tensors, file, metadata={"format": "pt"})
    for f in tiny_bert_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            (out / f.name).write_bytes(f.read_bytes())
    return out
