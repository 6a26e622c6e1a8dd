"""Torch work off the worker thread runs on a thread that exits when the work is done.

libgomp, the OpenMP runtime of torch's Linux CPU builds, keeps a pool of threads for every thread that ever
ran a parallel region, for as long as that thread lives. Once more pooled threads exist than CPUs, no pool
spins between parallel regions any more: each of the worker's regions then waits for its team to wake from
a futex. Measured on a 2-core machine (SmolLM2-135M, a decode step of 32 rows): 150 ms with one pool,
240 ms once one other thread had run a single parallel op, with ~1,100 voluntary context switches a step
instead of none; a mixed batch (~200 more regions a step) lost more. A pool ends with its thread, so the
server keeps one long-lived thread that runs parallel torch ops, its worker, and runs the rest (the model
load, a delta read in the background, an upload's checks) through `on_fresh_thread`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def on_fresh_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread, waited for: its result, or its exception re-raised here.

    The thread (and any OpenMP pool it started) has ended by the time this returns.

    Example:
        >>> on_fresh_thread(sum, [1, 2, 3])
        6
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"deltaserve-{getattr(fn, '__name__', 'task')}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
