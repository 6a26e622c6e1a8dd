"""deltaserve's optional C++ kernels (kernels.cpp): the seeded-mask generator, the mixed-batch side
product and the swap's scatter, compiled once per machine with torch's extension builder and cached as one module file.

Every caller keeps a torch-ops path that computes the same thing (masks bit for bit, side products to float
rounding), used wherever the module is not built: no C++ compiler, a GPU tensor, or DELTASERVE_NATIVE=0.

* `module()` — the compiled module if this machine has it, else None; never compiles, never waits.
* `build()` — compile now (about a minute), cache, return the module; `python -m deltas_store.native`
  does this (`make install` and the CPU Docker image run it).
* `build_in_background()` — start that command detached, once per process (the server does at startup);
  it finishes even if the process that started it exits, and `module()` picks the file up when it lands.

The file is cached under DELTASERVE_CACHE_DIR/native, keyed by the source, torch, Python and machine;
DELTASERVE_NATIVE_LIB names a prebuilt file instead (the CPU Docker image builds it in its build stage).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

import torch

from deltas_store.embedded import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
_NAME = "deltaserve_native"
# Portable: no -march, so a file built on one x86-64 runs on any other. -fopenmp because at::parallel_for is a
# header template that splits work only where _OPENMP is defined: without it every kernel ran on one thread
# whatever torch.get_num_threads() said. The GOMP symbols resolve to the OpenMP runtime torch itself loads
# (no link flag: a second runtime would bring its own thread pool).
_FLAGS = ("-O3", "-fopenmp") if platform.system() == "Linux" else ("-O3",)
_STALE_BUILD_S = 900.0  # a build marker older than this belongs to a build that died

_lock = threading.Lock()
_module: NativeKernels | None = None
_failed: set[Path] = set()  # files that would not import (logged once each)
_spawned = False


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled here (no compiler, no ninja, a build error)."""


class NativeKernels(Protocol):
    def pack_slots(
        self,
        crows: list[torch.Tensor],
        cols: list[torch.Tensor],
        vals: list[torch.Tensor],
        kept_rows: list[torch.Tensor],
        out_features: list[int],
    ) -> torch.Tensor: ...

    def side_linear_(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        slots: torch.Tensor,
        slot_ptr: torch.Tensor,
        slot_rows: torch.Tensor,
    ) -> None: ...

    def embedding_side_(
        self,
        out: torch.Tensor,
        ids: torch.Tensor,
        slots: torch.Tensor,
        slot_ptr: torch.Tensor,
        slot_rows: torch.Tensor,
    ) -> None: ...

    def parallel_threads(self, tasks: int) -> int: ...

    def seeded_keep(self, numel: int, key_a: int, key_b: int, threshold: int) -> torch.Tensor: ...

    def assign_(self, dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None: ...

    def assign_runs_(
        self, dst: torch.Tensor, starts: torch.Tensor, offsets: torch.Tensor, src: torch.Tensor
    ) -> None: ...


class SlotTable:
    """The side kernel's slots, validated once: `table` (S, 7) int64 holds raw pointers into `tensors`, which
    this object keeps alive. Slots may belong to different Linears (`out_features` per slot; side_linear_
    checks it against its output) and may be empty (a Linear the delta leaves alone). Build them once and
    reuse them every step: a call with lists of tensors paid ~1.5 µs per slot converting and checking them
    (~25 µs per Linear with 16 deltas)."""

    __slots__ = ("table", "tensors")

    def __init__(
        self,
        kernels: NativeKernels,
        crows: list[torch.Tensor],
        cols: list[torch.Tensor],
        vals: list[torch.Tensor],
        kept_rows: list[torch.Tensor],
        out_features: list[int],
    ) -> None:
        self.tensors = (tuple(crows), tuple(cols), tuple(vals), tuple(kept_rows))
        self.table = kernels.pack_slots(crows, cols, vals, kept_rows, out_features)


def enabled() -> bool:
    return os.environ.get("DELTASERVE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cached_path() -> Path:
    """Where this machine's build lives: one file per (source, flags, torch, Python, platform)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    for part in (*_FLAGS, torch.__version__, sys.version, platform.machine(), platform.system()):
        key.update(b"\0" + part.encode())
    return cache_root() / "native" / f"{_NAME}-{key.hexdigest()[:16]}.so"


def module() -> NativeKernels | None:
    """The compiled kernels if already built for this machine (or given by DELTASERVE_NATIVE_LIB)."""
    global _module
    if _module is not None or not enabled():
        return _module
    prebuilt = os.environ.get("DELTASERVE_NATIVE_LIB")
    path = Path(prebuilt) if prebuilt else cached_path()
    if path in _failed or not path.is_file():
        if prebuilt and path not in _failed:
            _failed.add(path)
            log.warning("DELTASERVE_NATIVE_LIB=%s does not exist; using torch ops", prebuilt)
        return None
    with _lock:
        if _module is None:
            try:
                _module = _import(path)
            except (ImportError, OSError) as exc:
                _failed.add(path)
                log.warning("native kernels in %s do not load (%s); using torch ops", path, exc)
    return _module


def build(verbose: bool = False) -> NativeKernels:
    """Compile kernels.cpp now unless this machine already has it; NativeBuildError when it cannot."""
    global _module
    if not enabled():
        raise NativeBuildError("DELTASERVE_NATIVE=0 turns the native kernels off")
    found = module()
    if found is not None:
        return found
    target = cached_path()
    try:
        from torch.utils.cpp_extension import load

        # A fresh build directory per build: torch's lock file there can never be left stale by a kill.
        with tempfile.TemporaryDirectory(prefix="deltaserve-native-") as tmp:
            built = load(
                name=_NAME, sources=[str(SOURCE)], extra_cflags=list(_FLAGS), build_directory=tmp,
                verbose=verbose,
            )  # fmt: skip
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(Path(tmp) / f"{_NAME}.so", partial)
            os.replace(partial, target)  # readers see the whole file or none
    except Exception as exc:  # a compiler's failure can surface as almost any exception type
        raise NativeBuildError(f"could not build the native kernels: {exc}") from exc
    with _lock:
        _module = built
    return built  # type: ignore[no-any-return]


def build_in_background() -> None:
    """Start `python -m deltas_store.native` detached unless the kernels exist or a build is running."""
    global _spawned
    if not enabled() or module() is not None or os.environ.get("DELTASERVE_NATIVE_LIB"):
        return
    with _lock:
        if _spawned:
            return
        _spawned = True
    marker = cached_path().with_suffix(".building")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        if marker.exists() and time.time() - marker.stat().st_mtime < _STALE_BUILD_S:
            return  # another process is building it
        marker.write_text(str(os.getpid()))
        logfile = marker.with_suffix(".log").open("w")
    except OSError as exc:
        log.warning("cannot start the native kernel build (%s); using torch ops", exc)
        return
    with logfile:
        subprocess.Popen(
            [sys.executable, "-m", "deltas_store.native", "--marker", str(marker)],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the server's exit and its signals
        )
    log.info("building the native kernels in the background (log: %s)", marker.with_suffix(".log"))


def _import(path: Path) -> NativeKernels:
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an extension module")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded  # type: ignore[return-value]
