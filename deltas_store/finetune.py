"""Short, deterministic full fine-tunes of a causal LM on chat examples (demos, tests, benchmarks)."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltas_store.progress import progress, transformers_bars_off


@dataclass(frozen=True)
class ChatExample:
    prompt: str
    answer: str


def _encode(tokenizer: Any, example: ChatExample) -> tuple[list[int], int]:
    """Token ids of the chat-formatted example and where the answer starts (loss is on the answer only)."""
    messages = [{"role": "user", "content": example.prompt}]
    prefix: list[int] = list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    answer: list[int] = tokenizer(example.answer + (tokenizer.eos_token or ""), add_special_tokens=False)[
        "input_ids"
    ]
    return prefix + answer, len(prefix)


def finetune_chat(
    base_dir: Path,
    examples: Sequence[ChatExample],
    out_dir: Path,
    *,
    steps: int = 40,
    lr: float = 1e-4,
    seed: int = 0,
    quiet: bool = False,
    desc: str = "fine-tuning",
    trainable: str | None = None,
) -> Path:
    """Full fine-tune (all weights, Adam, float32, CPU-friendly) of a chat model; cached in out_dir.

    `trainable` (a regex) limits training to matching parameters (the rest stay frozen, so their delta
    is exactly zero and costs nothing); None trains every weight. Writes out_dir atomically; if it
    already holds a model, returns it without training.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with transformers_bars_off():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if trainable is not None:
        pattern = re.compile(trainable)
        for name, param in model.named_parameters():
            param.requires_grad_(pattern.search(name) is not None)
    encoded = [_encode(tokenizer, e) for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)  # (B, T), right-padded
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, start) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
        mask[row, : len(ids)] = 1
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    bar = progress(range(steps), total=steps, desc=desc, quiet=quiet)
    for _ in bar:
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.eval()  # type: ignore[no-untyped-call]
        with transformers_bars_off():
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
