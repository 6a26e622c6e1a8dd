"""Batched generation on a resident causal LM: left-padded prefill, then one-token decode steps on a KV cache."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.engine.model import LoadedModel
from server.engine.request import Finished, FinishReason, GenerationRequest
from server.engine.sampling import choose_tokens, make_generator
from server.engine.text import TextStream
from server.errors import ContextLengthError, InvalidRequestError


class RowHooks(Protocol):
    """Per-row state outside the engine that must follow the batch's rows (a mixed batch's delta per row)."""

    def begin(self, requests: Sequence[GenerationRequest], device: torch.device) -> None:
        """Called once with the rows in batch order, before the first forward."""

    def select(self, keep: torch.Tensor) -> None:
        """Rows `keep` (K,) of the current batch stay, in that order (the others finished)."""

    def relay(self, requests: Sequence[GenerationRequest], device: torch.device) -> None:
        """The rows changed wholesale (rows joining are prefilled on their own, then decode with the
        others): what `end` then `begin(requests)` would do, as cheaply as the hooks can."""

    def end(self) -> None:
        """The batch is over (also after an error)."""


@dataclass(frozen=True)
class Admission:
    """What joins a running batch between two decode steps (continuous batching).

    `requests` are prefilled on their own, then decode with the others. `hooks`, when given, replace the
    batch's hooks from this step on, for every row: the scheduler turned a merged batch into a mixed one
    (restored the base weights; each row's delta is now a side term), so rows of other models can join.
    """

    requests: Sequence[GenerationRequest] = ()
    hooks: RowHooks | None = None


# Called between decode steps with the number of rows still running.
Joiner = Callable[[int], Admission]


@dataclass
class _Row:
    """A request's decoding state inside one batch."""

    request: GenerationRequest
    text: TextStream
    generator: torch.Generator | None
    generated: int = 0
    done: bool = False


class StepObserver(Protocol):
    """Told about every forward pass the engine runs (the server counts and times them in its metrics).

    `seconds` spans the forward pass and the choice of each row's next token (the device is synchronised
    by then: the tokens are on the host), not the hooks' relay or the rows' text.
    """

    def prefilled(self, rows: int, seconds: float) -> None: ...

    def decoded(self, rows: int, seconds: float) -> None: ...


class Engine:
    """Runs batches of requests for whatever weights are resident right now (the scheduler decides which).

    Greedy decoding is the same arithmetic as transformers' `generate(do_sample=False)`: logits of the last
    position cast to float32, argmax, stop at an EOS token.
    """

    def __init__(self, loaded: LoadedModel, observer: StepObserver | None = None) -> None:
        self.model = loaded.model
        self.observer = observer
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        # Fast tokenizers are not safe to use from two threads at once (API encodes, worker decodes).
        self._tokenizer_lock = threading.Lock()
        config = self.model.config
        gen_config = getattr(self.model, "generation_config", None)
        eos = getattr(gen_config, "eos_token_id", None) or getattr(config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        self.max_context: int | None = getattr(config, "max_position_embeddings", None)
        self.vocab_size = int(config.vocab_size)
        # transformers 5 renamed the forward argument `past_key_values` to `cache`.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # --- prompts ---

    def encode_prompt(self, prompt: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        from jinja2.exceptions import TemplateError  # transformers renders chat templates with jinja2

        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        with self._tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(
                    list(messages), add_generation_prompt=True, tokenize=False
                )
            except TemplateError as exc:
                raise InvalidRequestError(
                    f"the chat template rejected the messages: {exc}", param="messages"
                ) from exc
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def check_length(self, prompt_tokens: int, max_tokens: int | None, default_max_tokens: int) -> int:
        """The max_tokens to use; raises ContextLengthError when the prompt leaves no room."""
        if prompt_tokens == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if self.max_context is None:
            return max_tokens or default_max_tokens
        room = self.max_context - prompt_tokens
        if max_tokens is None:
            if room < 1:
                raise ContextLengthError(
                    f"the prompt has {prompt_tokens} tokens; this model's context is {self.max_context}"
                )
            return min(default_max_tokens, room)
        if max_tokens > room:
            raise ContextLengthError(
                f"this model's context is {self.max_context} tokens; the prompt has {prompt_tokens} and "
                f"max_tokens is {max_tokens}",
                param="max_tokens",
            )
        return max_tokens

    # --- generation ---

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        hooks: RowHooks | None = None,
        join: Joiner | None = None,
    ) -> int:
        """Run `requests` to completion with the resident weights; returns the number of tokens generated.

        Results go to each request's sink. If the model fails, every unfinished request gets the error.
        `hooks` follow the rows (a mixed batch adds each row's delta on the side). `join`, when given, is
        asked between decode steps for requests that join the running batch (continuous batching): they
        are prefilled on their own, their KV cache is merged into the batch's, and they decode with it.
        """
        everyone = self._rows(requests)  # every row this call served, joined ones included
        current: list[RowHooks] = []  # the hooks installed now (a join may replace them)
        try:
            try:
                if hooks is not None:
                    current.append(hooks)
                    hooks.begin([row.request for row in everyone], self.device)
                return self._run(everyone, current, join)
            finally:
                for installed in current:
                    installed.end()  # also after a failed begin: hooks undo whatever they installed
        except Exception as exc:
            for row in everyone:
                if not row.done:
                    row.done = True
                    row.request.sink.on_error(exc)
            raise

    def _rows(self, requests: Sequence[GenerationRequest]) -> list[_Row]:
        return [
            _Row(r, TextStream(self.decode, r.params.stop), None if r.params.greedy else self._generator(r))
            for r in requests
            if not r.cancelled
        ]

    def _generator(self, request: GenerationRequest) -> torch.Generator:
        return make_generator(request.params.seed, self.device)

    def _prefill(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
        """Left-padded prompts of `rows` through the model: (logits (B, V), mask, positions, cache)."""
        prompts = [r.request.prompt_ids for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding does not shift positions
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache)
        return logits, mask, positions, cache

    def _step(
        self, rows: list[_Row], logits: torch.Tensor, first: bool, started: float
    ) -> tuple[torch.Tensor, int]:
        """Choose and feed one token per row (the forward pass that gave `logits` began at perf_counter()
        `started`); returns (tokens (B,), tokens generated)."""
        tokens = choose_tokens(logits, [r.request.params for r in rows], [r.generator for r in rows])
        chosen = tokens.tolist()  # on the host: the forward pass is over, on any device
        if self.observer is not None:
            seconds = time.perf_counter() - started
            if first:
                self.observer.prefilled(len(rows), seconds)
            else:
                self.observer.decoded(len(rows), seconds)
        total = 0
        for row, token in zip(rows, chosen, strict=True):
            if first:
                row.request.sink.on_start()
            total += self._advance(row, int(token))
        return tokens, total

    def _run(self, everyone: list[_Row], current: list[RowHooks], join: Joiner | None) -> int:
        rows = list(everyone)
        if not rows:
            return 0
        started = time.perf_counter()
        logits, mask, positions, cache = self._prefill(rows)
        tokens, total = self._step(rows, logits, first=True, started=started)
        can_join = join is not None and _joinable(cache)
        while True:
            keep = [i for i, r in enumerate(rows) if not r.done]
            if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                rows = [rows[i] for i in keep]
                tokens, mask, positions = tokens[index], mask[index], positions[index]
                if rows:
                    cache.batch_select_indices(index)
                    for hooks in current:
                        hooks.select(index)
            admission = join(len(rows)) if can_join and join is not None else Admission()
            if admission.hooks is not None:  # from now on every row runs under the new hooks
                for hooks in current:
                    hooks.end()
                current[:] = [admission.hooks]
                admission.hooks.begin([r.request for r in rows], self.device)
            joined = self._rows(admission.requests)
            if joined:
                everyone.extend(joined)
                new_tokens, new_mask, new_positions, new_cache, generated = self._admit(rows, joined, current)
                total += generated
                if rows:
                    mask = _merge_caches_(cache, mask, new_cache, new_mask)
                    tokens = torch.cat([tokens, new_tokens])
                    positions = torch.cat([positions[:, -1:], new_positions[:, -1:]])
                else:
                    cache, mask, tokens, positions = new_cache, new_mask, new_tokens, new_positions
                rows = rows + joined
                continue  # rows that joined may already be done (max_tokens 1, EOS): drop them first
            if not rows:
                return total
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)  # (B, T+1)
            positions = positions[:, -1:] + 1  # (B, 1)
            started = time.perf_counter()
            logits = self._forward(tokens[:, None], mask, positions, cache)
            tokens, generated = self._step(rows, logits, first=False, started=started)
            total += generated

    def _admit(
        self, rows: list[_Row], joined: list[_Row], current: list[RowHooks]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache, int]:
        """Prefill rows that join a running batch on their own (the hooks see only them meanwhile), then
        re-lay the hooks over every row; returns their (first tokens, mask, positions, cache, generated)."""
        for hooks in current:
            hooks.relay([r.request for r in joined], self.device)
        try:
            started = time.perf_counter()
            logits, mask, positions, cache = self._prefill(joined)
            tokens, generated = self._step(joined, logits, first=True, started=started)
        finally:
            for hooks in current:
                hooks.relay([r.request for r in rows + joined], self.device)
        return tokens, mask, positions, cache, generated

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:  # (B, V) float32 logits of the last position
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits.to(dtype=torch.float32)  # (B, V)

    def _advance(self, row: _Row, token: int) -> int:
        """Feed one sampled token to a row; returns 1 if it counted as generated."""
        request = row.request
        if row.done:
            return 0
        if request.cancelled:
            self._finish(row, "cancelled")
            return 0
        row.generated += 1
        if token in self.eos_ids and not request.params.ignore_eos:
            self._finish(row, "stop")
            return 1
        text = row.text.push(token)
        if text:
            request.sink.on_text(text)
        if row.text.stopped:
            self._finish(row, "stop")
        elif row.generated >= request.params.max_tokens:
            self._finish(row, "length")
        return 1

    def _finish(self, row: _Row, reason: FinishReason) -> None:
        row.done = True
        if reason != "cancelled":
            rest = row.text.finish()
            if rest:
                row.request.sink.on_text(rest)
        row.request.sink.on_finish(
            Finished(row.text.text, reason, len(row.request.prompt_ids), row.generated)
        )


def _joinable(cache: DynamicCache) -> bool:
    """Rows can join a batch whose cache is plain full-attention layers (no sliding window, no state)."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _merge_caches_(
    cache: DynamicCache, mask: torch.Tensor, new: DynamicCache, new_mask: torch.Tensor
) -> torch.Tensor:
    """Append `new`'s rows to `cache` (in place), left-padding the shorter side's keys and values with
    masked zeros; returns the merged attention mask (B + B', max(L, L'))."""
    width = max(mask.shape[1], new_mask.shape[1])

    def pad(t: torch.Tensor, length: int) -> torch.Tensor:  # (B, H, L, D) -> (B, H, length, D), zeros left
        extra = length - t.shape[-2]
        return t if extra == 0 else torch.cat([t.new_zeros((*t.shape[:-2], extra, t.shape[-1])), t], dim=-2)

    for layer, other in zip(cache.layers, new.layers, strict=True):
        assert isinstance(layer, DynamicLayer) and isinstance(other, DynamicLayer)  # _joinable checked
        assert layer.keys is not None and layer.values is not None
        assert other.keys is not None and other.values is not None
        layer.keys = torch.cat([pad(layer.keys, width), pad(other.keys, width)])
        layer.values = torch.cat([pad(layer.values, width), pad(other.values, width)])

    def pad_mask(m: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.new_zeros((m.shape[0], width - m.shape[1])), m], dim=1)

    return torch.cat([pad_mask(mask), pad_mask(new_mask)])
