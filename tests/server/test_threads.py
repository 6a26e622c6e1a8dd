"""Torch work off the worker runs on threads that end with it, so a serving process keeps one OpenMP pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deltas_store import CompressOptions, compress
from server.engine.threads import on_fresh_thread
from tests.models import perturb, write_tiny_llama
from tests.server.conftest import ADMIN_KEY, BASE_ID, make_settings, seeded_store, start_server

pools = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2,
    reason="counts OS threads in /proc; an OpenMP pool needs two torch threads",
)


def _native_threads() -> set[int]:
    """This process's OS threads that are not Python threads (OpenMP pool threads among them)."""
    python = {t.native_id for t in threading.enumerate()}
    return {int(p.name) for p in Path("/proc/self/task").iterdir()} - python


def _drops_to(count: Callable[[], int], bound: int, timeout_s: float = 10.0) -> int:
    """`count()` once it is at most `bound` (a pool's threads exit just after their thread ends), or its last
    value after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    now = count()
    while now > bound and time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
    return now


def _parallel_op() -> None:
    torch.ones(1 << 22).add_(1)  # 4M elements: far above at::parallel_for's grain, so a parallel region


def test_on_fresh_thread_returns_the_result_from_another_thread_that_has_ended() -> None:
    ran_on: list[threading.Thread] = []

    def work(a: int, *, b: int) -> int:
        ran_on.append(threading.current_thread())
        return a + b

    assert on_fresh_thread(work, 2, b=3) == 5
    assert ran_on[0] is not threading.current_thread()
    assert not ran_on[0].is_alive()


def test_on_fresh_thread_raises_the_error_in_the_caller() -> None:
    error = ValueError("bad delta")

    def fail() -> None:
        raise error

    with pytest.raises(ValueError) as caught:
        on_fresh_thread(fail)
    assert caught.value is error


@pools
def test_an_openmp_pool_started_on_a_fresh_thread_ends_with_it() -> None:
    """From a thread that never ran torch: the op through on_fresh_thread leaves no thread behind; the same
    op run by that thread itself leaves its pool (what the server avoids on every thread but the worker)."""
    grown: dict[str, int] = {}

    def caller() -> None:
        before = _native_threads()
        on_fresh_thread(_parallel_op)
        grown["fresh"] = _drops_to(lambda: len(_native_threads() - before), 0)
        _parallel_op()  # the pool's threads exist once the op returns
        grown["own"] = len(_native_threads() - before)

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join()
    if grown["own"] == 0:
        pytest.skip("this torch's OpenMP runtime keeps no pool per thread")
    assert grown["fresh"] == 0


@pools
def test_a_serving_process_keeps_one_openmp_pool_the_workers(tmp_path: Path) -> None:
    """Loading the base, reading a delta in the background, an upload's checks and generating all run parallel
    torch ops (a 40k vocabulary makes them large enough): only the worker's pool may stay."""
    base = write_tiny_llama(tmp_path / "base", vocab_size=40_000)
    deltas = {}
    for i in range(2):
        ft = perturb(base, tmp_path / f"ft-{i}", scale=0.05, seed=100 + i)
        out = tmp_path / f"ft-{i}.safetensors"
        deltas[f"ft-{i}"] = compress(
            CompressOptions(base, ft, out, method="dare", drop_rate=0.5, seed=i)
        ).path
    store = seeded_store(tmp_path / "store", {"ft-0": deltas["ft-0"]})
    before = _native_threads()
    live = start_server(make_settings(base, store, max_batch_size=4))
    try:
        with live.client() as c:
            for model in (BASE_ID, "ft-0"):  # ft-0 is read from disk in the background first
                body = {
                    "model": model,
                    "prompt": "Hello",
                    "max_tokens": 2,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
        with live.client(ADMIN_KEY) as c, deltas["ft-1"].open("rb") as fh:
            r = c.post(
                "/v1/deltas", files={"file": ("ft-1", fh, "application/octet-stream")}, data={"name": "ft-1"}
            )
            assert r.status_code == 201, r.text
        worker_pool = torch.get_num_threads() - 1
        assert _drops_to(lambda: len(_native_threads() - before), worker_pool) <= worker_pool
    finally:
        live.stop()
