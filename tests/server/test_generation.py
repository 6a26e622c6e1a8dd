"""End to end through uvicorn: exact greedy outputs per delta, bit-exact base, concurrency, streaming."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.server.conftest import BASE_ID, MAX_TOKENS, PROMPTS, LiveServer


def complete(live: LiveServer, model: str, prompt: str, **extra: object) -> dict[str, object]:
    with live.client() as c:
        r = c.post(
            "/v1/completions",
            json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra},
        )
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def text_of(body: dict[str, object]) -> str:
    choices = body["choices"]
    assert isinstance(choices, list)
    return str(choices[0]["text"])


def test_greedy_output_of_every_model_equals_transformers_on_the_applied_dir(
    live: LiveServer, references: dict[str, list[str]]
) -> None:
    for model, expected in references.items():
        got = [text_of(complete(live, model, p)) for p in PROMPTS]
        assert got == expected, model


def test_base_is_unchanged_and_bit_identical_after_many_swaps(
    live: LiveServer, references: dict[str, list[str]], tiny_llama_dir: Path
) -> None:
    before = text_of(complete(live, BASE_ID, PROMPTS[0]))
    for _ in range(3):
        for model in ("ft-0", "ft-1", "ft-2", BASE_ID):
            complete(live, model, PROMPTS[1])
    assert text_of(complete(live, BASE_ID, PROMPTS[0])) == before == references[BASE_ID][0]
    runtime = live.runtime
    runtime.scheduler.call(runtime.swaps.deactivate).result()
    original = load_file(tiny_llama_dir / "model.safetensors")
    resident = dict(runtime.engine.model.named_parameters())
    assert set(original) == set(resident)
    for name, tensor in original.items():
        assert torch.equal(resident[name].detach(), tensor), name
    assert runtime.metrics.swaps._value.get() >= 6


def test_many_concurrent_clients_each_get_their_models_output(
    live: LiveServer, references: dict[str, list[str]]
) -> None:
    models = [BASE_ID, "ft-0", "ft-1", "ft-2"]
    jobs = [(models[i % 4], i % len(PROMPTS)) for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: text_of(complete(live, job[0], PROMPTS[job[1]])), jobs))
    assert results == [references[m][p] for m, p in jobs]


def test_batched_prompts_list_returns_one_choice_per_prompt(
    live: LiveServer, references: dict[str, list[str]]
) -> None:
    with live.client() as c:
        r = c.post(
            "/v1/completions",
            json={"model": "ft-1", "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0},
        )
    body = r.json()
    assert [ch["text"] for ch in sorted(body["choices"], key=lambda ch: ch["index"])] == references["ft-1"]
    assert body["usage"]["completion_tokens"] > 0
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


def _sse(lines: list[str]) -> list[object]:
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_text_equals_non_streamed_text_and_ends_with_done(live: LiveServer) -> None:
    body = {"model": "ft-2", "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0}
    full = text_of(complete(live, "ft-2", PROMPTS[3], max_tokens=12))
    with (
        live.client() as c,
        c.stream(
            "POST",
            "/v1/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(list(r.iter_lines()))
    text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])  # type: ignore[index]
    assert text == full
    assert chunks[-1]["usage"]["completion_tokens"] >= 1  # type: ignore[index]
    assert any(ch["choices"] and ch["choices"][0]["finish_reason"] for ch in chunks)  # type: ignore[index]


def test_chat_uses_the_template_and_streams_the_same_text(live: LiveServer) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hello world! How are you?"}]
    req = {"model": "ft-0", "messages": messages, "max_tokens": 10, "temperature": 0}
    with live.client() as c:
        r = c.post("/v1/chat/completions", json=req)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        tok = AutoTokenizer.from_pretrained(live.settings.base)
        prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert body["usage"]["prompt_tokens"] == len(tok(prompt_ids, add_special_tokens=False)["input_ids"])
        with c.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as s:
            chunks = _sse(list(s.iter_lines()))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"  # type: ignore[index]
    streamed = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)  # type: ignore[index]
    assert streamed == body["choices"][0]["message"]["content"]


def test_stop_strings_cut_the_text_and_report_stop(
    live: LiveServer, references: dict[str, list[str]]
) -> None:
    full = references["ft-1"][0]
    assert len(full) > 3
    stop = full[2:4]
    body = complete(live, "ft-1", PROMPTS[0], stop=[stop])
    assert text_of(body) == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]


def test_seeded_sampling_is_reproducible(live: LiveServer) -> None:
    req = {"temperature": 1.5, "top_p": 0.9, "seed": 1234, "max_tokens": 12}
    a = text_of(complete(live, "ft-0", PROMPTS[0], **req))
    b = text_of(complete(live, "ft-0", PROMPTS[0], **req))
    assert a == b
    others = {text_of(complete(live, "ft-0", PROMPTS[0], **{**req, "seed": s})) for s in range(5)}
    assert len(others) > 1


def test_request_id_is_echoed_or_generated(live: LiveServer) -> None:
    with live.client() as c:
        assert c.get("/v1/models", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
        assert len(c.get("/v1/models").headers["x-request-id"]) >= 16


def test_models_health_ready_and_metrics(live: LiveServer) -> None:
    with live.client() as c:
        models = c.get("/v1/models").json()
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        complete(live, "ft-0", PROMPTS[0])
        metrics = c.get("/metrics").text
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {BASE_ID, "ft-0", "ft-1", "ft-2"}
    assert by_id[BASE_ID]["parent"] is None and by_id["ft-0"]["parent"] == BASE_ID
    for name in (
        "deltaserve_request_seconds_bucket",
        "deltaserve_time_to_first_token_seconds_bucket",
        "deltaserve_queue_depth",
        "deltaserve_swaps_total",
        "deltaserve_swap_seconds_bucket",
        "deltaserve_delta_cache_bytes",
        'deltaserve_delta_resident{delta="ft-0"}',
    ):
        assert name in metrics, name


def _counter(metrics: str, name: str) -> float:
    (line,) = [x for x in metrics.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def test_metrics_count_and_time_every_prefill_and_decode_step_with_its_rows(live: LiveServer) -> None:
    names = ("deltaserve_prefills_total", "deltaserve_prefill_rows_total", "deltaserve_decode_steps_total",
             "deltaserve_decode_rows_total", "deltaserve_prefill_seconds_count", "deltaserve_prefill_seconds_sum",
             "deltaserve_decode_step_seconds_count", "deltaserve_decode_step_seconds_sum")  # fmt: skip
    with live.client() as c:
        before = {n: _counter(c.get("/metrics").text, n) for n in names}
        started = time.perf_counter()
        body = complete(live, "ft-1", PROMPTS[1], max_tokens=6, ignore_eos=True)
        wall = time.perf_counter() - started
        after = {n: _counter(c.get("/metrics").text, n) for n in names}
    delta = {n: after[n] - before[n] for n in names}
    usage = body["usage"]
    assert isinstance(usage, dict) and usage["completion_tokens"] == 6
    # one row: its prompt's prefill gives the first token, then one decode step per further token
    assert delta["deltaserve_prefills_total"] == 1
    assert delta["deltaserve_prefill_rows_total"] == 1
    assert delta["deltaserve_decode_steps_total"] == 5
    assert delta["deltaserve_decode_rows_total"] == 5
    # each pass is timed once, and the passes took part of the request's time, not more
    assert delta["deltaserve_prefill_seconds_count"] == 1
    assert delta["deltaserve_decode_step_seconds_count"] == 5
    passes = delta["deltaserve_prefill_seconds_sum"] + delta["deltaserve_decode_step_seconds_sum"]
    assert 0 < passes < wall


def test_ignore_eos_generates_exactly_max_tokens(live: LiveServer) -> None:
    body = complete(live, "ft-0", PROMPTS[0], max_tokens=20, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 20  # type: ignore[index]
    assert body["choices"][0]["finish_reason"] == "length"  # type: ignore[index]


def test_the_demo_asks_for_transformers_greedy_answer(live: LiveServer) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.demo import ask

    tok = AutoTokenizer.from_pretrained(live.settings.base)
    model = AutoModelForCausalLM.from_pretrained(live.settings.base, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "Hello world! How are you?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    ids = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    greedy = tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    with live.client() as http:
        assert ask(http, BASE_ID, messages[0]["content"], MAX_TOKENS) == greedy
