"""Progress bars for long steps: shown on a TTY, silent otherwise or with --quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None, *, total: int | None, desc: str, quiet: bool) -> Any:
    """A tqdm bar over `iterable` (or a manual bar when None), disabled off-TTY or when quiet."""
    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


@contextmanager
def transformers_bars_off() -> Iterator[None]:
    """Silence transformers' own bars ("Loading weights", ...), drawn even off a TTY, for one step."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
