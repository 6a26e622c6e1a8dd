"""Unit invariants of the server's parts: incremental text with stop strings, top-p, the delta cache, scheduling."""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams
from server.engine.sampling import choose_tokens, make_generator, top_p_filter_
from server.engine.text import TextStream


def _chars(ids: object) -> str:
    return "".join(chr(i) for i in ids)  # type: ignore[attr-defined]


def _run(ts: TextStream, text: str) -> str:
    out = ""
    for ch in text:
        out += ts.push(ord(ch))
        if ts.stopped:
            break
    return out + ts.finish()


def test_text_stream_concatenation_equals_the_final_text() -> None:
    ts = TextStream(_chars)
    assert _run(ts, "hello world") == ts.text == "hello world"


def test_stop_string_is_cut_and_never_leaked_even_across_tokens() -> None:
    ts = TextStream(_chars, stop=("wor", "zzz"))
    assert _run(ts, "hello world") == ts.text == "hello "
    assert ts.stopped
    ts = TextStream(_chars, stop=("zz",))
    assert _run(ts, "abz cz") == "abz cz" and not ts.stopped


def test_incomplete_characters_are_held_back() -> None:
    seq = ["a", "a\ufffd", "aé"]
    ts = TextStream(lambda ids: seq[len(ids) - 1])
    assert [ts.push(1), ts.push(2), ts.push(3)] == ["a", "", "é"]


def test_top_p_keeps_the_smallest_head_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert (top_p_filter_(probs.clone(), 0.7) > 0).tolist() == [True, True, False, False]
    assert (top_p_filter_(probs.clone(), 0.1) > 0).tolist() == [True, False, False, False]
    assert torch.equal(top_p_filter_(probs.clone(), 1.0), probs)


def test_greedy_rows_take_argmax_and_seeded_rows_repeat() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    sampled = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    cpu = torch.device("cpu")
    gens = [None, make_generator(7, cpu), make_generator(7, cpu)]
    tokens = choose_tokens(logits.clone(), [greedy, sampled, sampled], gens)
    assert tokens[0] == logits[0].argmax()
    again = choose_tokens(logits.clone(), [greedy, sampled, sampled], [None, make_generator(7, cpu), None])
    assert again[1] == tokens[1]


def test_delta_cache_evicts_least_recently_used_under_budget() -> None:
    from deltas_store.patching import PatchOp, PreparedDelta
    from server.routing.cache import DeltaCache

    def prepared(name: str, n: int) -> PreparedDelta:
        op = PatchOp("w", None, torch.zeros(n, dtype=torch.float32))
        return PreparedDelta(name, None, (op,))  # type: ignore[arg-type]

    cache = DeltaCache(budget_bytes=100)
    assert cache.put(("a", 1), prepared("a", 10))  # 40 bytes
    assert cache.put(("b", 1), prepared("b", 10))
    assert cache.get(("a", 1)) is not None  # a is now the most recent
    assert cache.put(("c", 1), prepared("c", 10))  # 120 > 100: evicts b
    assert cache.cached() == [("a", 1), ("c", 1)] and cache.nbytes == 80
    assert not cache.put(("huge", 1), prepared("huge", 100))  # over the whole budget: not kept
    cache.evict("a")
    assert cache.cached() == [("c", 1)] and cache.device_of("c") == "cpu" and cache.device_of("a") is None
