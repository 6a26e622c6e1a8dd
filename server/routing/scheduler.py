"""A queue per model, batches of one model at a time, and one worker thread that owns the weights."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

from deltas_store import DeltaStoreError
from server.engine.generator import Engine
from server.engine.request import Finished, GenerationRequest
from server.errors import NotReadyError, QueueFullError, ServerError
from server.metrics import ServerMetrics
from server.routing.loading import DeltaLoader
from server.routing.patching import SwapManager

log = logging.getLogger(__name__)
T = TypeVar("T")
_Control = tuple[Callable[[], object], "Future[object]"]


class Scheduler:
    """Serves queued requests in batches of one model, so a swap is paid per batch, not per request.

    Which model next: the one patched in now while it has work and nobody has waited longer than
    `max_wait_s` (no swap needed); otherwise the model whose oldest request has waited longest.
    Control calls (an upload's test-apply, a delete's restore) run on the worker between batches.

    Example:
        >>> scheduler.start()  # doctest: +SKIP
        >>> scheduler.submit([request])  # results arrive on request.sink  # doctest: +SKIP
    """

    def __init__(
        self,
        engine: Engine,
        swaps: SwapManager,
        loader: DeltaLoader,
        metrics: ServerMetrics,
        *,
        max_batch_size: int,
        max_queue: int,
        max_wait_s: float,
        retry_after_s: int,
    ) -> None:
        self.engine = engine
        self.swaps = swaps
        self.loader = loader
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self._cond = threading.Condition()
        self._queues: dict[str, deque[GenerationRequest]] = {}
        self._control: deque[_Control] = deque()
        self._queued = 0
        self._current: str | None = None  # the model whose weights are patched in (None: not yet chosen)
        self._running: list[GenerationRequest] = []
        self._running_model: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="deltaserve-worker", daemon=True)

    # --- called from the API (any thread) ---

    def start(self) -> None:
        self._thread.start()

    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        """Queue all of `requests` or none: raises QueueFullError (429) or NotReadyError when stopping."""
        with self._cond:
            if self._stopping:
                raise NotReadyError("the server is shutting down")
            if self._queued + len(requests) > self.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({self._queued} waiting, limit {self.max_queue}); retry later"
                )
            for request in requests:
                self._queues.setdefault(request.model, deque()).append(request)
                self.metrics.queue_depth.labels(request.model).set(len(self._queues[request.model]))
            self._queued += len(requests)
            self._cond.notify_all()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the worker thread between batches (it may touch the weights)."""
        future: Future[T] = Future()
        with self._cond:
            if self._stopping and not self._thread.is_alive():
                raise NotReadyError("the server is shutting down")
            self._control.append((fn, future))  # type: ignore[arg-type]
            self._cond.notify_all()
        return future

    def wait_idle(self, model: str, timeout: float) -> bool:
        """Block until no request for `model` is queued or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._queues.get(model) and self._running_model != model, timeout
            )

    @property
    def alive(self) -> bool:
        """The worker runs and accepts requests."""
        return self._thread.is_alive() and not self._stopping

    def queued(self) -> int:
        with self._cond:
            return self._queued

    def stop(self, timeout: float) -> None:
        """Finish queued and running requests (up to `timeout` s), then cancel what is left and stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if not self._thread.is_alive():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                left = [r for q in self._queues.values() for r in q] + list(self._running)
            log.warning("drain timed out after %.0fs: cancelling %d requests", timeout, len(left))
            for request in left:
                request.cancel()
            self._thread.join(5.0)

    # --- the worker thread ---

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._control or self._queued or self._stopping))
                if self._control:
                    control: _Control | None = self._control.popleft()
                elif self._queued:
                    control = None
                    model = self._pick()
                    batch = self._take(model)
                    self._running, self._running_model = batch, model
                else:
                    return  # stopping, and everything is drained
            if control is not None:
                _run_control(*control)
                continue
            try:
                self._run_batch(model, batch)
            finally:
                with self._cond:
                    self._running, self._running_model = [], None
                    self._cond.notify_all()

    def _pick(self) -> str:
        heads = {model: q[0].enqueued_at for model, q in self._queues.items() if q}
        oldest = min(heads, key=heads.__getitem__)
        if self._current in heads and time.monotonic() - heads[oldest] < self.max_wait_s:
            return self._current
        return oldest

    def _take(self, model: str) -> list[GenerationRequest]:
        queue = self._queues[model]
        batch: list[GenerationRequest] = []
        while queue and len(batch) < self.max_batch_size:
            request = queue.popleft()
            self._queued -= 1
            if request.cancelled:
                request.sink.on_finish(Finished("", "cancelled", len(request.prompt_ids), 0))
            else:
                batch.append(request)
        if not queue:
            del self._queues[model]
        self.metrics.queue_depth.labels(model).set(len(queue))
        return batch

    def _run_batch(self, model: str, batch: list[GenerationRequest]) -> None:
        if not batch:
            return
        try:
            key, prepared = self.loader.load(model)
            self.swaps.activate(key, prepared)
        except (DeltaStoreError, ServerError, OSError, RuntimeError) as exc:
            log.warning("cannot serve %s: %s", model, exc)
            for request in batch:
                request.sink.on_error(exc)
            return
        self._current = model
        self.metrics.batches.labels(model).inc()
        try:
            tokens = self.engine.generate(batch)
        except Exception:  # the engine already sent the error to every unfinished request
            log.exception("batch of %d requests for %s failed", len(batch), model)
            return
        self.metrics.generated_tokens.inc(tokens)


def _run_control(fn: Callable[[], object], future: Future[object]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - not swallowed: the caller re-raises it from the future
        future.set_exception(exc)
    else:
        future.set_result(result)
