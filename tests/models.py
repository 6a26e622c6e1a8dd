"""Tiny random Hugging Face models (Llama-style and BERT-style) written as real model directories."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuned variants of one base model share almost all of their weights.",
    "A sparse delta stores only what changed, pruned with DARE or DAREx.",
    "Hello world! How are you today? I am fine, thank you.",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ? !",
    "user assistant system: answer the question briefly.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer trained on a few sentences: encodes any text, decodes it back."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out)


def write_tiny_llama(out: Path, seed: int = 0, vocab_size: int = 320) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out)
    return out


def write_tiny_bert(out: Path, seed: int = 0, classifier: bool = False) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config) if classifier else BertModel(config)
    model.eval().save_pretrained(out, safe_serialization=True)
    write_tokenizer(out)
    return out


def perturb(src: Path, out: Path, scale: float, seed: int, skip: tuple[str, ...] = ()) -> Path:
    """A 'fine-tune' of src: every tensor moved by scale * std * N(0, 1) (a full, dense change)."""
    shutil.copytree(src, out)
    gen = torch.Generator().manual_seed(seed)
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        for name, t in tensors.items():
            if any(s in name for s in skip) or not t.is_floating_point():
                continue
            std = float(t.float().std()) if t.numel() > 1 else 1.0
            noise = torch.randn(t.shape, generator=gen) * (scale * (std or 1.0))
            tensors[name] = (t.float() + noise).to(t.dtype)
        save_file(tensors, file, metadata={"format": "pt"})
    return out


def cast_dir(src: Path, out: Path, dtype: torch.dtype) -> Path:
    shutil.copytree(src, out)
    for file in out.glob("*.safetensors"):
        tensors = {k: v.to(dtype) for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    return out
