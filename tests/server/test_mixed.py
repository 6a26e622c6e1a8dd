"""Mixed-delta batches end to end: rows of different deltas share one forward and still match `deltaserve apply`."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltas_store import CompressOptions, apply_to_dir, compress, native
from deltas_store.compression.sparsify import _seeded_keep_torch
from server.engine.mixed.batch import MixedBatch
from server.engine.request import Finished, GenerationRequest, SamplingParams
from server.runtime import Runtime
from tests.server.conftest import BASE_ID, MAX_TOKENS, PROMPTS, LiveServer, greedy_reference, seeded_store

# Mixed rows compute base(x) + x·ΔWᵀ instead of (W + ΔW)x: the same sums in another order. On the tiny fp32
# model the logits differ by ~2e-7 at most; 1e-4 leaves room for other BLAS builds, not for a wrong delta
# (a delta changes these logits by > 1e-2).
LOGIT_TOLERANCE = 1e-4


def held_batch(server: LiveServer, jobs: list[tuple[str, str]]) -> list[str]:
    """Queue every job while the worker is held, then release it: they run as few, full batches."""
    scheduler = server.runtime.scheduler
    gate = threading.Event()
    blocked = scheduler.call(gate.wait)

    def one(job: tuple[str, str]) -> str:
        with server.client() as c:
            r = c.post("/v1/completions", json={"model": job[0], "prompt": job[1], "max_tokens": MAX_TOKENS,
                                                "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        deadline = time.monotonic() + 30
        while scheduler.queued() < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Deltas only on disk are read in the background and their requests wait for it: let every read
        # finish first, so the batches hold every job as the test means them to.
        while (
            not all(scheduler.loader.ready(m, lambda: None) for m, _ in jobs) and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        gate.set()
        blocked.result(10)
        return [f.result(60) for f in futures]


def mixed_batches(server: LiveServer) -> float:
    return float(server.runtime.metrics.mixed_batches._value.get())


@pytest.fixture
def mixed_server(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path
) -> Iterator[LiveServer]:
    yield make_server(seeded_store(tmp_path / "store", delta_files), batch_mode="mixed", max_batch_size=16)


def test_mixed_batch_of_every_model_equals_the_applied_references(
    mixed_server: LiveServer, references: dict[str, list[str]]
) -> None:
    models = [BASE_ID, "ft-0", "ft-1", "ft-2"]
    jobs = [(models[i % 4], PROMPTS[(i // 4) % len(PROMPTS)]) for i in range(12)]
    texts = held_batch(mixed_server, jobs)
    assert texts == [references[m][PROMPTS.index(p)] for m, p in jobs]
    assert mixed_batches(mixed_server) >= 1
    assert mixed_server.runtime.swaps.active is None  # mixed batches never patch the weights


@pytest.mark.parametrize("kernel", ["native", "torch-ops"])
def test_both_side_kernels_give_the_applied_references(
    mixed_server: LiveServer, references: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    calls: list[int] = []
    if kernel == "native":
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler here to build the native kernels")
        real = native.build()

        class Counting:
            def side_linear_(self, *args: torch.Tensor) -> None:
                calls.append(1)
                real.side_linear_(*args)  # type: ignore[arg-type]

            def __getattr__(self, name: str) -> object:  # the mask generator, unchanged
                return getattr(real, name)

        monkeypatch.setattr(native, "module", Counting)
    else:  # what a machine without a C++ compiler (or any GPU) runs
        monkeypatch.setattr(native, "module", lambda: None)
    jobs = [("ft-0", PROMPTS[0]), ("ft-1", PROMPTS[1]), (BASE_ID, PROMPTS[2]), ("ft-0", PROMPTS[1])]
    assert held_batch(mixed_server, jobs) == [references[m][PROMPTS.index(p)] for m, p in jobs]
    assert mixed_batches(mixed_server) >= 1
    assert bool(calls) == (kernel == "native")


def test_mixed_rows_finishing_at_different_steps_keep_their_deltas(
    mixed_server: LiveServer, references: dict[str, list[str]]
) -> None:
    # max_tokens differ per row, so rows leave the batch one by one (the row map shrinks mid-batch).
    rows = [("ft-2", 2, 1), (BASE_ID, 8, 1), ("ft-0", 4, 1), ("ft-1", 8, 1), ("ft-0", 8, 3), ("ft-2", 5, 0)]
    scheduler = mixed_server.runtime.scheduler
    gate = threading.Event()
    blocked = scheduler.call(gate.wait)

    def one(model: str, n: int, p: int) -> str:
        with mixed_server.client() as c:
            body = {"model": model, "prompt": PROMPTS[p], "max_tokens": n, "temperature": 0}
            return str(c.post("/v1/completions", json=body).json()["choices"][0]["text"])

    with ThreadPoolExecutor(len(rows)) as pool:
        futures = [pool.submit(one, *row) for row in rows]
        while scheduler.queued() < len(rows):
            time.sleep(0.01)
        gate.set()
        blocked.result(10)
        texts = [f.result(60) for f in futures]
    for (model, n, p), text in zip(rows, texts, strict=True):
        assert references[model][p].startswith(text), (model, n, p)
        if n == MAX_TOKENS:
            assert text == references[model][p]


def test_mixed_logits_are_within_tolerance_of_merged_and_tokens_equal(mixed_server: LiveServer) -> None:
    runtime = mixed_server.runtime
    rows = [("ft-0", 0), ("ft-1", 1), (BASE_ID, 2), ("ft-2", 3), ("ft-0", 1)]
    merged, mixed = runtime.scheduler.call(lambda: _logits(runtime, rows)).result(60)
    assert torch.equal(merged.argmax(-1), mixed.argmax(-1))
    assert float((merged - mixed).abs().max()) < LOGIT_TOLERANCE


def _logits(runtime: Runtime, rows: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, V) last-position logits per row: merged (each delta patched in, one row at a time) and mixed
    (all rows in one batch on the base). Runs on the worker thread, which owns the weights."""
    engine, loader, swaps = runtime.engine, runtime.scheduler.loader, runtime.swaps
    prompts = [engine.encode_prompt(PROMPTS[p]) for _, p in rows]
    merged = []
    for (model, _), ids in zip(rows, prompts, strict=True):
        swaps.activate(*loader.load(model))
        merged.append(_forward(engine.model, [ids])[0])
    swaps.deactivate()
    layouts = {}
    for model, _ in rows:
        served = loader.load(model)[1]
        layouts[model] = None if served is None else served.mixed
    assert loader.uses is not None
    batch = MixedBatch(engine.model, loader.uses, layouts)
    requests = [GenerationRequest(model, ids, SamplingParams(max_tokens=1), _NullSink()) for (model, _), ids in
                zip(rows, prompts, strict=True)]  # fmt: skip
    batch.begin(requests, engine.device)
    try:
        mixed = _forward(engine.model, prompts)
    finally:
        batch.end()
    return torch.stack(merged), mixed


@torch.inference_mode()
def _forward(model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits[:, -1, :].float()


class _NullSink:
    def on_start(self) -> None: ...
    def on_text(self, text: str) -> None: ...
    def on_finish(self, result: Finished) -> None: ...
    def on_error(self, error: BaseException) -> None: ...


def test_base_weights_are_bit_identical_after_mixed_and_merged_batches(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path, tiny_llama_dir: Path
) -> None:
    server = make_server(
        seeded_store(tmp_path / "store", delta_files), batch_mode="auto", mixed_max_density=1.0
    )
    held_batch(server, [("ft-0", PROMPTS[0]), ("ft-1", PROMPTS[1]), (BASE_ID, PROMPTS[2])])  # mixed
    held_batch(server, [("ft-2", PROMPTS[0])] * 3)  # one model only: merged
    assert server.runtime.swaps.active == ("ft-2", 1)
    held_batch(server, [("ft-0", PROMPTS[0]), ("ft-1", PROMPTS[1]), ("ft-2", PROMPTS[2])])  # mixed: unpatches
    assert mixed_batches(server) >= 2 and server.runtime.swaps.active is None
    original = load_file(tiny_llama_dir / "model.safetensors")
    resident = dict(server.runtime.engine.model.named_parameters())
    for name, tensor in original.items():
        assert torch.equal(resident[name].detach(), tensor), name


def test_auto_mode_serves_a_dominant_model_merged(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    references: dict[str, list[str]],
) -> None:  # fmt: skip
    store = seeded_store(tmp_path / "store", delta_files)
    server = make_server(store, batch_mode="auto", mixed_max_density=1.0, max_wait_ms=60_000)
    jobs = [("ft-0", PROMPTS[0])] + [("ft-1", PROMPTS[i % 4]) for i in range(8)]
    texts = held_batch(server, jobs)
    assert texts == [references[m][PROMPTS.index(p)] for m, p in jobs]
    # ft-1 fills a whole batch (8): merged first (patched in), then ft-0 alone, merged too.
    assert mixed_batches(server) == 0 and server.runtime.metrics.swaps._value.get() >= 2


def test_auto_mode_never_mixes_deltas_denser_than_the_limit(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    references: dict[str, list[str]],
) -> None:  # fmt: skip
    server = make_server(seeded_store(tmp_path / "store", delta_files), batch_mode="auto")  # limit 0.05 < 0.5
    jobs = [("ft-0", PROMPTS[0]), ("ft-1", PROMPTS[1]), ("ft-2", PROMPTS[2])]
    assert held_batch(server, jobs) == [references[m][PROMPTS.index(p)] for m, p in jobs]
    assert mixed_batches(server) == 0


def test_a_delta_no_side_term_covers_is_served_merged_in_a_mixed_server(
    make_server: Callable[..., LiveServer], delta_files: dict[str, Path], tmp_path: Path,
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], references: dict[str, list[str]],
) -> None:  # fmt: skip
    # q_proj stored whole (a dense replacement) cannot be a sparse side product: merged only.
    dense = compress(CompressOptions(tiny_llama_dir, tiny_llama_finetunes["ft-1"], tmp_path / "dense.safetensors",
                                     method="dare", drop_rate=0.5, seed=3, keep_dense=(r".*q_proj.*",))).path  # fmt: skip
    reference = greedy_reference(apply_to_dir(tiny_llama_dir, dense, tmp_path / "dense-applied"), PROMPTS)
    server = make_server(
        seeded_store(tmp_path / "store", {**delta_files, "dense": dense}), batch_mode="mixed"
    )
    jobs = [("dense", PROMPTS[0]), ("ft-0", PROMPTS[1]), ("dense", PROMPTS[2]), (BASE_ID, PROMPTS[3])]
    texts = held_batch(server, jobs)
    expected = {**references, "dense": reference}
    assert texts == [expected[m][PROMPTS.index(p)] for m, p in jobs]
    assert server.runtime.metrics.batches.labels("dense")._value.get() >= 1


def test_a_failing_mixed_batch_fails_its_requests_and_leaves_the_model_intact(
    mixed_server: LiveServer, references: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.engine.mixed.batch as batch_module

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("side product failed")

    class BrokenKernel:
        side_linear_ = staticmethod(broken)

        @staticmethod
        def pack_slots(crows: list[torch.Tensor], *args: object) -> torch.Tensor:
            table = torch.zeros(len(crows), 7, dtype=torch.long)  # never read: side_linear_ fails first
            table[:, 4] = 1  # but it claims kept values everywhere, so side_linear_ is called
            return table

        @staticmethod
        def seeded_keep(numel: int, key_a: int, key_b: int, threshold: int) -> torch.Tensor:
            return _seeded_keep_torch(numel, key_a, key_b, threshold, "cpu")  # masks still work

    monkeypatch.setattr(batch_module, "grouped_side", broken)  # the torch-ops path
    monkeypatch.setattr(native, "module", BrokenKernel)  # and the native one
    with mixed_server.client() as c:
        r = c.post("/v1/completions", json={"model": "ft-1", "prompt": PROMPTS[0], "max_tokens": 2})
    assert r.status_code >= 500
    monkeypatch.undo()
    model = mixed_server.runtime.engine.model
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())  # stacked norm weights gone
    jobs = [("ft-1", PROMPTS[0]), (BASE_ID, PROMPTS[1]), ("ft-2", PROMPTS[2])]
    assert held_batch(mixed_server, jobs) == [references[m][PROMPTS.index(p)] for m, p in jobs]
