"""The optional C++ side-product kernel (side.cpp), compiled on first use with torch's JIT extension loader.

Compiling needs a C++ compiler and ninja; where either is missing (or the build fails) `side_kernel()`
returns None, logs why once, and mixed batches use the torch-ops path in kernels.py. Set
DELTASERVE_NATIVE=0 to skip it, or DELTASERVE_NATIVE_LIB to a prebuilt module file to load it without a
compiler (the CPU Docker image builds it in its build stage). The build is cached under torch's extensions directory
(TORCH_EXTENSIONS_DIR), so only the first process on a machine pays for it (about a minute); the server
starts it in the background (`build_in_background`) and mixed batches take `built_side_kernel()`, which
never waits: until the build is done they use the torch-ops path.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)
_NAME = "deltaserve_side"


class SideKernel(Protocol):
    def side_linear_(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        crows: list[torch.Tensor],
        cols: list[torch.Tensor],
        vals: list[torch.Tensor],
        slot_ptr: torch.Tensor,
        slot_rows: torch.Tensor,
    ) -> None: ...


@functools.cache
def side_kernel() -> SideKernel | None:
    """The compiled module, or None where it cannot be built here (logged once)."""
    if os.environ.get("DELTASERVE_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return None
    prebuilt = os.environ.get("DELTASERVE_NATIVE_LIB")
    try:
        if prebuilt:
            return _import(Path(prebuilt))
        from torch.utils.cpp_extension import load

        module: Any = load(
            name=_NAME,
            sources=[str(Path(__file__).with_name("side.cpp"))],
            extra_cflags=["-O3"],
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch-ops path
        log.warning("native side kernel unavailable (%s); mixed batches use torch ops", exc)
        return None
    return module  # type: ignore[no-any-return]


def _import(path: Path) -> SideKernel:
    """Import a module file built by `side_kernel()` elsewhere (same torch, same Python)."""
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module  # type: ignore[return-value]


_build: threading.Thread | None = None
_build_lock = threading.Lock()


def build_in_background() -> None:
    """Start building (or loading) the kernel on a daemon thread, once per process."""
    global _build
    with _build_lock:
        if _build is None:
            _build = threading.Thread(target=side_kernel, name="deltaserve-native-build", daemon=True)
            _build.start()


def built_side_kernel() -> SideKernel | None:
    """The kernel if it is already built in this process, without waiting; starts the build otherwise."""
    build_in_background()
    assert _build is not None
    return None if _build.is_alive() else side_kernel()
