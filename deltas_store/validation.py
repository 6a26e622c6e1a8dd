"""Labeled validation metrics for the q search: a JSONL file becomes a function model -> score (higher wins).

Two built-in metrics, chosen by the file's fields:
- `{"text": ..., "label": int}` per line: classification accuracy of a sequence-classification fine-tune
  (argmax of its logits);
- `{"prompt": ..., "answer": ...}` per line: exact match of a causal LM's greedy answer (chat template when
  the tokenizer has one; at most a few tokens more than the longest answer).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from deltas_store.errors import CalibrationError

Metric = Callable[[torch.nn.Module], float]


@dataclass(frozen=True)
class ValidationSet:
    kind: Literal["classification", "generation"]
    inputs: tuple[str, ...]
    targets: tuple[Any, ...]  # int labels or answer strings

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.kind == "classification" else "exact_match"


def load_validation(path: Path) -> ValidationSet:
    """Parse a validation JSONL file; CalibrationError names the first bad line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read validation file {path}: {exc}") from None
    inputs: list[str] = []
    targets: list[Any] = []
    kinds: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str) and _is_label(row.get("label")):
            kinds.add("classification")
            inputs.append(row["text"])
            targets.append(int(row["label"]))
        elif (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("answer"), str)
        ):
            kinds.add("generation")
            inputs.append(row["prompt"])
            targets.append(row["answer"])
        else:
            raise CalibrationError(
                f'{path}:{number}: expected {{"text": str, "label": int}} or {{"prompt": str, "answer": str}}'
            )
    if not inputs:
        raise CalibrationError(f"validation file {path} has no examples")
    if len(kinds) != 1:
        raise CalibrationError(f"validation file {path} mixes classification and generation examples")
    kind: Literal["classification", "generation"] = (
        "classification" if kinds == {"classification"} else "generation"
    )
    return ValidationSet(kind, tuple(inputs), tuple(targets))


def _is_label(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def build_metric(
    data: ValidationSet, tokenizer: Any, *, batch_size: int = 32, max_length: int = 256
) -> Metric:
    """The metric function for `data`, tokenized once with the fine-tune's tokenizer."""
    if data.kind == "classification":
        return _accuracy(data, tokenizer, batch_size, max_length)
    return _exact_match(data, tokenizer, batch_size)


def _accuracy(data: ValidationSet, tokenizer: Any, batch_size: int, max_length: int) -> Metric:
    batches = []
    for start in range(0, len(data.inputs), batch_size):
        texts = list(data.inputs[start : start + batch_size])
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = torch.tensor(data.targets[start : start + batch_size])
        keep = ("input_ids", "attention_mask", "token_type_ids")
        batches.append(({k: v for k, v in enc.items() if k in keep}, labels))

    def accuracy(model: torch.nn.Module) -> float:
        correct = 0
        with torch.no_grad():
            for batch, labels in batches:
                logits = model(**batch).logits  # (B, num_labels)
                correct += int((logits.argmax(dim=-1) == labels).sum())
        return correct / len(data.inputs)

    return accuracy


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return list(tokenizer(prompt)["input_ids"])


def _exact_match(data: ValidationSet, tokenizer: Any, batch_size: int) -> Metric:
    prompts = [_prompt_ids(tokenizer, p) for p in data.inputs]
    answers: Sequence[str] = [str(a).strip() for a in data.targets]
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    max_new = longest + 4
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def exact_match(model: torch.nn.Module) -> float:
        hits = 0
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T), left-padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            with torch.no_grad():
                out = model.generate(  # type: ignore[operator]
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=pad,
                )
            for row, generated in enumerate(out[:, width:]):
                text = tokenizer.decode(generated, skip_special_tokens=True).strip()
                hits += int(text == answers[start + row])
        return hits / len(prompts)

    return exact_match
