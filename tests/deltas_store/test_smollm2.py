"""The real packaged SmolLM2-135M-Instruct: fine-tune briefly, compress, apply, generate greedily."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltas_store.apply import apply_to_dir
from deltas_store.compression.pipeline import CompressOptions, compress
from deltas_store.embedded import embedded_base_dir
from deltas_store.format.io import read_delta
from deltas_store.patching import apply_delta_, prepare_delta, restore_

pytestmark = pytest.mark.slow

TRAIN_TEXT = "Q: What is the secret word? A: The secret word is pineapple."
PROMPT = "Q: What is the secret word? A:"


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The embedded base and a real (tiny) full fine-tune of it: 12 Adam steps on one sentence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = embedded_base_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = tokenizer([TRAIN_TEXT], return_tensors="pt")
    model.train()
    for _ in range(12):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("smollm2") / "finetuned"
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return base, out


def _greedy(model: torch.nn.Module, tokenizer: object, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)  # type: ignore[operator]
    return list(out[0, ids["input_ids"].shape[1] :].tolist())


def test_compress_apply_generate_round_trip(smollm2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, ft_dir = smollm2_pair
    result = compress(
        CompressOptions(base_dir, ft_dir, tmp_path / "secret.safetensors", method="darex-q", drop_rate=0.9)
    )
    assert result.manifest.q is not None and result.manifest.calibration is not None
    assert result.file_bytes < 0.15 * result.finetuned_bytes
    applied_dir = apply_to_dir(base_dir, result.path, tmp_path / "applied")

    tokenizer = AutoTokenizer.from_pretrained(applied_dir)
    applied = AutoModelForCausalLM.from_pretrained(applied_dir, dtype=torch.float32).eval()
    finetuned = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_tokens = _greedy(base, tokenizer, PROMPT)
    applied_tokens = _greedy(applied, tokenizer, PROMPT)

    # The fine-tune learned the answer, and the 10%-dense delta keeps it.
    assert "pineapple" in tokenizer.decode(_greedy(finetuned, tokenizer, PROMPT))
    assert "pineapple" in tokenizer.decode(applied_tokens)
    assert "pineapple" not in tokenizer.decode(base_tokens)

    # Hot-swapping the same delta in place gives the applied model's tokens; restoring gives the base's.
    weights = dict(base.named_parameters())
    saved = apply_delta_(weights, prepare_delta(read_delta(result.path), weights))
    assert _greedy(base, tokenizer, PROMPT) == applied_tokens
    restore_(saved)
    assert _greedy(base, tokenizer, PROMPT) == base_tokens
