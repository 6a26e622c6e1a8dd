"""Choosing the next token per row: greedy argmax, or temperature + top-p sampling with a per-request generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.request import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A private RNG for one request: seeded when asked, so the same seed gives the same sample."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def top_p_filter_(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out the tail of `probs` (V,) beyond the smallest set whose mass reaches `top_p`, in place."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    # Keep a token if the mass before it is still under top_p (so the top token is always kept).
    before = sorted_probs.cumsum(0) - sorted_probs
    drop = order[before >= top_p]
    probs[drop] = 0.0
    return probs


def choose_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Next token id per row of `logits` (B, V) float32; returns (B,) int64 on the logits' device."""
    tokens = logits.argmax(dim=-1)  # (B,) greedy for every row, overwritten for sampled rows
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)  # (V,)
        probs = top_p_filter_(probs, p.top_p)
        tokens[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return tokens
