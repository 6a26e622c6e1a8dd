"""The native kernel module's loader: switched off, a missing prebuilt file, the build command, the cache key."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltas_store import native
from deltas_store.compression.sparsify import seeded_keep_indices


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader as a new process sees it."""
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", set())
    monkeypatch.setattr(native, "_spawned", False)


def needs_compiler() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here to build the native kernels")


def test_switched_off_means_no_module_and_the_torch_mask(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_compiler()
    native.build()
    with_native = seeded_keep_indices(70_000, 0.05, 1, "w")
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setenv("DELTASERVE_NATIVE", "0")
    assert native.module() is None
    with pytest.raises(native.NativeBuildError, match="DELTASERVE_NATIVE=0"):
        native.build()
    native.build_in_background()
    assert not native._spawned  # nothing started
    assert torch.equal(seeded_keep_indices(70_000, 0.05, 1, "w"), with_native)


def test_a_missing_or_broken_prebuilt_file_is_reported_once_and_torch_ops_run(
    fresh: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DELTASERVE_NATIVE_LIB", str(tmp_path / "missing.so"))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.module() is None
        assert native.module() is None
    assert sum("does not exist" in r.message for r in caplog.records) == 1
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setenv("DELTASERVE_NATIVE_LIB", str(broken))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.module() is None
    assert any("do not load" in r.message for r in caplog.records)
    assert seeded_keep_indices(1000, 1.0, 0, "w").numel() == 1000  # the torch path still serves


def test_the_build_command_copies_a_module_that_loads_without_a_compiler(
    fresh: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    needs_compiler()
    native.build()  # cached: the command below finds it instead of compiling again
    target = tmp_path / "kernels.so"
    done = subprocess.run(
        [sys.executable, "-m", "deltas_store.native", "--quiet", "--copy-to", str(target)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    # A process with no compiler on PATH loads the copy (what the CPU Docker image does).
    env = {
        "PATH": str(Path(sys.executable).parent),
        "DELTASERVE_NATIVE_LIB": str(target),
        "HOME": str(tmp_path),
    }
    code = (
        "from deltas_store import native; from deltas_store.compression.sparsify import seeded_keep_indices;"
        "assert native.module() is not None; print(seeded_keep_indices(100000, 0.01, 3, 'w').sum().item())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == int(seeded_keep_indices(100_000, 0.01, 3, "w").sum())


def test_the_cache_key_follows_the_source(
    fresh: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DELTASERVE_CACHE_DIR", str(tmp_path))
    first = native.cached_path()
    assert first.parent == tmp_path / "native"
    edited = tmp_path / "kernels.cpp"
    edited.write_text(native.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.cached_path() != first  # an edited kernel is never confused with an old build
    assert native.module() is None  # and nothing is built for it yet


def test_a_background_build_already_running_is_not_started_twice(
    fresh: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DELTASERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "module", lambda: None)
    marker = native.cached_path().with_suffix(".building")
    marker.parent.mkdir(parents=True)
    marker.write_text("12345")  # a live build of another process
    started: list[object] = []
    monkeypatch.setattr(native.subprocess, "Popen", lambda *a, **k: started.append(a))
    native.build_in_background()
    assert started == []
    monkeypatch.setattr(native, "_spawned", False)
    old = marker.stat().st_mtime - native._STALE_BUILD_S - 1
    os.utime(marker, (old, old))  # that build died long ago
    native.build_in_background()
    assert len(started) == 1
    native.build_in_background()
    assert len(started) == 1  # once per process


@pytest.mark.skipif(sys.platform != "linux", reason="built with OpenMP on Linux only")
def test_kernels_split_work_across_torchs_threads() -> None:
    """at::parallel_for only splits work in code compiled with OpenMP: built without it, every kernel ran on
    one thread whatever torch.get_num_threads() said (the swap and side kernels did, until this test)."""
    needs_compiler()
    kernels = native.build()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert kernels.parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert kernels.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_assign_writes_raw_bits_at_sorted_positions_and_nothing_else(dtype: torch.dtype) -> None:
    needs_compiler()
    kernels = native.build()
    gen = torch.Generator().manual_seed(0)
    dst = torch.randn(100_003, generator=gen).to(dtype)
    index = torch.sort(torch.randperm(100_003, generator=gen)[:40_000]).values
    src = torch.randn(40_000, generator=gen).to(dtype)
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dst.element_size()]
    src.view(width)[:3] = torch.tensor(
        [-1, 0x7FF0 if width is torch.int16 else -2, 1], dtype=width
    )  # NaN bits
    expected = dst.clone()
    expected.view(width).scatter_(0, index, src.view(width))
    kernels.assign_(dst, index, src)
    assert torch.equal(dst.view(width), expected.view(width))  # bit for bit, NaN payloads included


def test_assign_refuses_out_of_range_or_mismatched_arguments_and_writes_nothing() -> None:
    needs_compiler()
    kernels = native.build()
    dst = torch.zeros(10)
    cases = {
        "out of range": (torch.tensor([2, 10]), torch.ones(2)),
        "one value per index": (torch.tensor([1, 2]), torch.ones(3)),
        "int64": (torch.tensor([1, 2], dtype=torch.int32), torch.ones(2)),
        "same element size": (torch.tensor([1, 2]), torch.ones(2, dtype=torch.float16)),
    }
    for message, (index, src) in cases.items():
        with pytest.raises(RuntimeError, match=message):
            kernels.assign_(dst, index, src)
    assert not dst.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_assign_runs_copies_whole_runs_bit_for_bit(dtype: torch.dtype) -> None:
    needs_compiler()
    kernels = native.build()
    from deltas_store.compression.sparsify import seeded_keep_blocks

    gen = torch.Generator().manual_seed(1)
    dst = torch.randn(50_000, generator=gen).to(dtype)
    index = seeded_keep_blocks(50_000, 0.1, 0, "w", 16)
    begins = torch.ones(index.numel(), dtype=torch.bool)
    begins[1:] = index[1:] != index[:-1] + 1
    at = begins.nonzero().squeeze(1)
    starts, offsets = index[at], torch.cat([at, torch.tensor([index.numel()])])
    src = torch.randn(index.numel(), generator=gen).to(dtype)
    expected = dst.clone()
    expected[index] = src
    kernels.assign_runs_(dst, starts, offsets, src)
    width = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(dst.view(width), expected.view(width))


def test_assign_runs_refuses_bad_runs_and_writes_nothing() -> None:
    needs_compiler()
    kernels = native.build()
    dst = torch.zeros(10)
    cases = {
        "out of range": (torch.tensor([8]), torch.tensor([0, 3]), torch.ones(3)),
        "from 0 to src.numel": (torch.tensor([1]), torch.tensor([0, 2]), torch.ones(3)),
        "one more entry": (torch.tensor([1, 4]), torch.tensor([0, 2]), torch.ones(2)),
        "int64": (torch.tensor([1], dtype=torch.int32), torch.tensor([0, 2]), torch.ones(2)),
    }
    for message, (starts, offsets, src) in cases.items():
        with pytest.raises(RuntimeError, match=message):
            kernels.assign_runs_(dst, starts, offsets, src)
    assert not dst.any()
