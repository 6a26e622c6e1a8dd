"""Continuous batching: queued requests join a running batch between decode steps, and still get the exact
greedy text `deltaserve apply` gives; an overdue model is never jumped by requests joining another's batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.engine.request import Finished, GenerationRequest, SamplingParams
from tests.server.conftest import BASE_ID, MAX_TOKENS, PROMPTS, LiveServer, seeded_store

LONG_TOKENS = 200


class HeldSink:
    """A long request's sink that holds the worker mid-batch (inside its third piece of text) until
    `release`, so the test can queue requests while the batch is decoding, deterministically."""

    def __init__(self) -> None:
        self.pieces = 0
        self.started = threading.Event()  # the batch is decoding, and the worker is held
        self.release = threading.Event()
        self.done = threading.Event()
        self.result: Finished | None = None
        self.error: BaseException | None = None

    def on_start(self) -> None: ...

    def on_text(self, text: str) -> None:
        self.pieces += 1
        if self.pieces == 3:
            self.started.set()
            self.release.wait(30)

    def on_finish(self, result: Finished) -> None:
        self.result = result
        self.done.set()

    def on_error(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


def long_request(server: LiveServer, model: str) -> HeldSink:
    """Submit a long generation (EOS ignored) for `model` straight to the scheduler; returns once its
    batch decodes, with the worker held until the sink's `release`."""
    runtime = server.runtime
    sink = HeldSink()
    params = SamplingParams(max_tokens=LONG_TOKENS, temperature=0.0, ignore_eos=True)
    runtime.scheduler.submit([GenerationRequest(model, runtime.engine.encode_prompt("Once"), params, sink)])
    assert sink.started.wait(30), "the long request never started decoding"
    return sink


def assert_runs_to_the_end(long: HeldSink) -> None:
    """The long request, whatever joined its batch, still produced every one of its tokens."""
    assert long.done.wait(30) and long.result is not None and long.result.completion_tokens == LONG_TOKENS


def release_when_queued(server: LiveServer, long: HeldSink, count: int) -> None:
    """Let the held batch go on once `count` requests are queued."""
    deadline = time.monotonic() + 30
    while server.runtime.scheduler.queued() < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.runtime.scheduler.queued() == count
    long.release.set()


def complete(server: LiveServer, model: str, prompt: str) -> str:
    with server.client() as c:
        r = c.post(
            "/v1/completions",
            json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
        )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def complete_while_held(
    server: LiveServer, long: HeldSink, jobs: list[tuple[str, int]]
) -> dict[tuple[str, int], str]:
    """Post every (model, prompt index) job at once while the long batch is held, release it once all
    are queued; returns each job's text."""
    texts: dict[tuple[str, int], str] = {}

    def run(job: tuple[str, int]) -> None:
        texts[job] = complete(server, job[0], PROMPTS[job[1]])

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    release_when_queued(server, long, len(jobs))
    for t in threads:
        t.join(60)
    return texts


def batches(server: LiveServer, model: str) -> float:
    return float(server.runtime.metrics.batches.labels(model)._value.get())


@pytest.mark.parametrize("continuous", [True, False])
def test_a_request_joins_the_running_batch_of_its_model(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    references: dict[str, list[str]], continuous: bool,
) -> None:  # fmt: skip
    server = make_server(
        seeded_store(tmp_path / "store", delta_files), batch_mode="merged", continuous_batching=continuous
    )
    long = long_request(server, "ft-0")
    texts: list[str] = []
    short = threading.Thread(target=lambda: texts.append(complete(server, "ft-0", PROMPTS[1])))
    short.start()
    release_when_queued(server, long, 1)
    short.join(60)
    assert texts == [references["ft-0"][1]]
    if continuous:
        assert not long.done.is_set(), "the short request should have joined, not waited for the batch"
        assert batches(server, "ft-0") == 1  # one batch served both
    else:
        assert long.done.is_set(), "without continuous batching a request waits for the running batch"
        assert batches(server, "ft-0") == 2
    assert_runs_to_the_end(long)


def test_requests_of_other_models_join_a_mixed_batch_with_their_own_deltas(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    references: dict[str, list[str]],
) -> None:  # fmt: skip
    server = make_server(seeded_store(tmp_path / "store", delta_files), batch_mode="mixed", max_batch_size=8)
    for model in ("ft-1", "ft-2"):  # read from disk up front, so they can join at once
        server.runtime.scheduler.loader.load(model)
    long = long_request(server, BASE_ID)  # the batch starts with the base alone: no delta installed yet
    mixed_before = float(server.runtime.metrics.mixed_batches._value.get())
    jobs = [("ft-1", 0), ("ft-2", 2), ("ft-1", 3), (BASE_ID, 1)]
    texts = complete_while_held(server, long, jobs)
    assert not long.done.is_set(), "the requests should have joined the running mixed batch"
    assert {job: texts.get(job) for job in jobs} == {(m, i): references[m][i] for m, i in jobs}
    assert float(server.runtime.metrics.mixed_batches._value.get()) == mixed_before  # no new batch
    assert_runs_to_the_end(long)


@pytest.mark.parametrize("mixable", [True, False])
def test_auto_turns_a_running_merged_batch_mixed_so_other_models_join(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    references: dict[str, list[str]], mixable: bool,
) -> None:  # fmt: skip
    # The test deltas keep half their entries: mixable only when auto's density limit allows it.
    server = make_server(
        seeded_store(tmp_path / "store", delta_files), batch_mode="auto", max_batch_size=8,
        mixed_max_density=1.0 if mixable else 0.05,
    )  # fmt: skip
    runtime = server.runtime
    for model in ("ft-1", "ft-2"):
        runtime.scheduler.loader.load(model)
    mixed_before = float(runtime.metrics.mixed_batches._value.get())
    long = long_request(server, "ft-0")  # alone in the queue: served merged, ft-0 patched in
    assert runtime.swaps.active is not None and runtime.swaps.active[0] == "ft-0"
    assert float(runtime.metrics.mixed_batches._value.get()) == mixed_before
    jobs = [("ft-1", 0), ("ft-2", 2), (BASE_ID, 1)]
    texts = complete_while_held(server, long, jobs)
    assert {job: texts.get(job) for job in jobs} == {(m, i): references[m][i] for m, i in jobs}
    if not mixable:  # the running batch stays merged: the other models waited for it to end
        assert long.done.is_set()
        return
    assert not long.done.is_set(), (
        f"the others should have joined the running batch ({long.error!r}, {long.result})"
    )
    assert float(runtime.metrics.mixed_batches._value.get()) == mixed_before + 1  # the batch turned mixed
    assert runtime.swaps.active is None  # ... on the restored base weights
    assert_runs_to_the_end(long)


def test_an_overdue_model_is_not_jumped_by_requests_joining_another_batch(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    references: dict[str, list[str]],
) -> None:  # fmt: skip
    server = make_server(seeded_store(tmp_path / "store", delta_files), batch_mode="merged", max_wait_ms=20.0)
    server.runtime.scheduler.loader.load("ft-1")  # merged mode: the running batch never turns mixed
    long = long_request(server, "ft-0")
    finished: dict[str, float] = {}

    def run(model: str, i: int) -> None:
        assert complete(server, model, PROMPTS[i]) == references[model][i]
        finished[model] = time.monotonic()

    other = threading.Thread(target=run, args=("ft-1", 0))
    other.start()
    deadline = time.monotonic() + 30
    while server.runtime.scheduler.queued() < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)  # ft-1's request is now overdue (20 ms), and waits for ft-0's batch to end
    same = threading.Thread(target=run, args=("ft-0", 2))
    same.start()
    release_when_queued(server, long, 2)
    other.join(60)
    same.join(60)
    assert long.done.is_set() and set(finished) == {"ft-0", "ft-1"}
    assert finished["ft-1"] < finished["ft-0"], "ft-0's request jumped ahead of an overdue ft-1 request"
