"""A queue per model, merged batches of one model or mixed batches of many, and one worker thread."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import TypeVar

from deltas_store import DeltaStoreError
from server.engine.generator import Admission, Engine, Joiner, RowHooks
from server.engine.mixed.layout import MixedDelta
from server.engine.request import Finished, GenerationRequest
from server.errors import NotReadyError, QueueFullError, ServerError
from server.metrics import ServerMetrics
from server.routing.loading import DeltaLoader
from server.routing.patching import SwapManager
from server.routing.policy import BatchPolicy
from server.routing.served import ServedDelta

log = logging.getLogger(__name__)
T = TypeVar("T")
_Control = tuple[Callable[[], object], "Future[object]"]
MixerFactory = Callable[[Mapping[str, MixedDelta | None]], RowHooks]  # request.model -> layout (None: base)
_LOAD_ERRORS = (DeltaStoreError, ServerError, OSError, RuntimeError)


class Scheduler:
    """Serves queued requests in batches, so a swap is paid per batch, not per request.

    Merged batches hold one model: the one patched in now while it has work and nobody has waited longer
    than `max_wait_s` (no swap needed), otherwise the model whose oldest request has waited longest. Mixed
    batches (when `policy` says so) hold the oldest requests of every mixable model and run on the pure
    base with each row's delta added on the side. Control calls (an upload's test-apply, a delete's
    restore) run on the worker between batches.

    Continuous batching (`continuous`): between decode steps, queued requests join the running batch up
    to max_batch_size — requests for the patched-in model join a merged batch while no other model's
    request is overdue; requests of any mixable model join a mixed batch. Joining costs a prefill pass of
    its own, so requests join in groups: once enough wait to fill a quarter of a batch (or all the room
    left), or once the oldest has waited max_wait_s. A long generation so never holds back requests that
    could share its forward passes, and never holds an overdue model back for longer than the batch's
    remaining steps.

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
        policy: BatchPolicy | None = None,
        mixer: MixerFactory | None = None,
        continuous: bool = True,
    ) -> None:
        self.engine = engine
        self.swaps = swaps
        self.loader = loader
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self.policy = policy if mixer is not None and policy is not None else BatchPolicy("merged")
        self.mixer = mixer
        self.continuous = continuous
        self._cond = threading.Condition()
        self._queues: dict[str, deque[GenerationRequest]] = {}
        self._control: deque[_Control] = deque()
        self._queued = 0
        self._current: str | None = None  # the model whose weights are patched in (None: not yet chosen)
        self._running: list[GenerationRequest] = []
        self._running_models: set[str] = set()
        self._unmixable: set[str] = set()  # models last seen without a (worthwhile) mixed layout
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
        for model in dict.fromkeys(r.model for r in requests):
            self.loader.ready(model, self._wake)  # a delta only on disk starts loading now, off the worker

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
                lambda: not self._queues.get(model) and model not in self._running_models, timeout
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
                    plan = self._plan()
                    if plan is None:  # every queued model is still being read from disk
                        self._cond.wait()  # a finished read (or a new request) wakes us
                        continue
                    mixed, model, batch = plan
                    self._running, self._running_models = batch, {r.model for r in batch}
                else:
                    return  # stopping, and everything is drained
            if control is not None:
                _run_control(*control)
                continue
            try:
                if mixed:
                    self._run_mixed(batch)
                else:
                    self._run_batch(model, batch)
            finally:
                with self._cond:
                    self._running, self._running_models = [], set()
                    self._cond.notify_all()

    def _plan(self) -> tuple[bool, str, list[GenerationRequest]] | None:
        """(mixed?, the merged batch's model, the batch), or None while every queued model is still being
        read in the background; called with the lock held. Models only on disk wait for their read."""
        ready = [m for m, q in self._queues.items() if q and self.loader.ready(m, self._wake)]
        if not ready:
            return None
        picked = self._pick(ready)
        queued = {m: len(self._queues[m]) for m in ready if m not in self._unmixable}
        oldest = min(self._queues[m][0].enqueued_at for m in ready)
        overdue = time.monotonic() - oldest >= self.max_wait_s
        model = self.policy.merged_model(picked, queued, self.max_batch_size, overdue)
        if model is None:
            return True, picked, self._take_oldest(list(queued))
        return False, model, self._take(model)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _pick(self, ready: list[str]) -> str:
        heads = {model: self._queues[model][0].enqueued_at for model in ready}
        oldest = min(heads, key=heads.__getitem__)
        if self._current in heads and time.monotonic() - heads[oldest] < self.max_wait_s:
            return self._current
        return oldest

    def _take_oldest(self, models: list[str], limit: int | None = None) -> list[GenerationRequest]:
        """Up to `limit` (default max_batch_size) requests of `models`, oldest first (no model waits
        behind a busy one)."""
        batch: list[GenerationRequest] = []
        queues = [self._queues[m] for m in models]
        while len(batch) < (self.max_batch_size if limit is None else limit):
            heads = [q for q in queues if q]
            if not heads:
                break
            request = min(heads, key=lambda q: q[0].enqueued_at).popleft()
            self._queued -= 1
            if request.cancelled:
                request.sink.on_finish(Finished("", "cancelled", len(request.prompt_ids), 0))
            else:
                batch.append(request)
        for model in models:
            self.metrics.queue_depth.labels(model).set(len(self._queues[model]))
            if not self._queues[model]:
                del self._queues[model]
        return batch

    def _requeue(self, requests: list[GenerationRequest]) -> None:
        """Put requests back at the front of their queues (a mixed batch could not take them)."""
        with self._cond:
            for request in reversed(requests):
                self._queues.setdefault(request.model, deque()).appendleft(request)
                self._queued += 1
            self._running = [r for r in self._running if r not in requests]
            self._running_models = {r.model for r in self._running}
            self._cond.notify_all()

    def _take(self, model: str, limit: int | None = None) -> list[GenerationRequest]:
        queue = self._queues[model]
        batch: list[GenerationRequest] = []
        while queue and len(batch) < (self.max_batch_size if limit is None else limit):
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
            key, served = self.loader.load(model)
            self.swaps.activate(key, served)
        except _LOAD_ERRORS as exc:
            log.warning("cannot serve %s: %s", model, exc)
            for request in batch:
                request.sink.on_error(exc)
            return
        if served is not None and served.mixed is not None and self.policy.mixable(served.mixed):
            self._unmixable.discard(model)  # a new version may mix where the old one could not
        self._current = model
        self.metrics.batches.labels(model).inc()
        try:
            tokens = self.engine.generate(batch, join=self._merged_joiner(model, served))
        except Exception:  # the engine already sent the error to every unfinished request
            log.exception("batch of %d requests for %s failed", len(batch), model)
            return
        self.metrics.generated_tokens.inc(tokens)

    def _run_mixed(self, batch: list[GenerationRequest]) -> None:
        """One forward pass for every row on the pure base, each row's delta added on the side."""
        if not batch or self.mixer is None:
            return
        layouts: dict[str, MixedDelta | None] = {}
        run = self._resolve_layouts(batch, layouts)
        if not run:
            return
        try:
            self.swaps.deactivate()  # mixed batches run on the pure base weights
        except _LOAD_ERRORS as exc:
            for request in run:
                request.sink.on_error(exc)
            return
        self._current = None
        for model in layouts:
            self.metrics.batches.labels(model).inc()
        self.metrics.mixed_batches.inc()
        try:
            tokens = self.engine.generate(run, hooks=self.mixer(layouts), join=self._mixed_joiner(layouts))
        except Exception:  # the engine already sent the error to every unfinished request
            log.exception("mixed batch of %d requests over %d models failed", len(run), len(layouts))
            return
        self.metrics.generated_tokens.inc(tokens)

    def _resolve_layouts(
        self, batch: list[GenerationRequest], layouts: dict[str, MixedDelta | None]
    ) -> list[GenerationRequest]:
        """Add each new model of `batch` to `layouts` (None: the base); returns the requests that can run
        mixed. Requests of a model that fails to load get the error; those of an unmixable one are
        requeued (served merged from now on)."""
        later: list[GenerationRequest] = []
        failed: set[str] = set()
        for model in dict.fromkeys(r.model for r in batch):
            if model in layouts:
                continue
            rows = [r for r in batch if r.model == model]
            try:
                _, served = self.loader.load(model)
            except _LOAD_ERRORS as exc:
                log.warning("cannot serve %s: %s", model, exc)
                for request in rows:
                    request.sink.on_error(exc)
                failed.add(model)
                continue
            if served is None:
                layouts[model] = None  # the base: no side term
            elif served.mixed is not None and self.policy.mixable(served.mixed):
                layouts[model] = served.mixed
            else:
                self._unmixable.add(model)  # served merged from now on
                later.extend(rows)
        if later:
            self._requeue(later)
        return [r for r in batch if r.model in layouts and r.model not in failed]

    # --- continuous batching: what joins a running batch between decode steps ---

    def _may_join(self) -> bool:
        """Called with the lock held: no control call waits for the batch to end."""
        return self.continuous and not self._control

    def _worth_joining(self, queues: list[deque[GenerationRequest]], room: int) -> bool:
        """Enough requests wait to be worth a prefill pass of their own, or one has waited long enough."""
        waiting = sum(len(q) for q in queues)
        if waiting >= min(room, max(1, self.max_batch_size // 4)):
            return True
        oldest = min((q[0].enqueued_at for q in queues if q), default=None)
        return oldest is not None and time.monotonic() - oldest >= self.max_wait_s

    def _overdue_elsewhere(self, model: str) -> bool:
        """Some other ready model's oldest request has waited past max_wait_s (lock held)."""
        now = time.monotonic()
        return any(
            m != model
            and q
            and now - q[0].enqueued_at >= self.max_wait_s
            and self.loader.ready(m, self._wake)
            for m, q in self._queues.items()
        )

    def _mixable_ready(self) -> list[str]:
        """Lock held: queued models that are read from disk and not known to be unmixable."""
        return [
            m
            for m, q in self._queues.items()
            if q and m not in self._unmixable and self.loader.ready(m, self._wake)
        ]

    def _admitted(self, joined: list[GenerationRequest]) -> None:
        """`joined` now run (wait_idle and shutdown see them)."""
        with self._cond:
            self._running = self._running + joined
            self._running_models |= {r.model for r in joined}

    def _merged_joiner(self, model: str, served: ServedDelta | None) -> Joiner:
        """Requests for the patched-in `model` join its batch while no other model's request is overdue.

        `auto` goes further: once enough requests of other mixable models wait (and `model` does not fill
        a batch on its own), the running batch turns mixed at this step — the base weights are restored,
        every row's delta becomes a side term (the rows' KV caches stay valid: the same function), and the
        waiting requests join. A merged batch so never shuts other models out until it ends.
        """
        mixed: list[Joiner] = []  # set once the batch turned mixed

        def join(running: int) -> Admission:
            if mixed:
                return mixed[0](running)
            room = self.max_batch_size - running
            with self._cond:
                if room <= 0 or not self._may_join():
                    return Admission()
                if not self._should_turn_mixed(model, served, room):
                    queue = self._queues.get(model)
                    if not queue or not self._worth_joining([queue], room) or self._overdue_elsewhere(model):
                        return Admission()
                    joined = self._take(model, room)
                    self._admitted(joined)
                    return Admission(joined)
            assert self.mixer is not None  # _should_turn_mixed checked it
            layouts: dict[str, MixedDelta | None] = {model: served.mixed if served is not None else None}
            self.swaps.deactivate()  # between two decode steps, on the worker: the weights are ours
            self._current = None
            self.metrics.mixed_batches.inc()
            mixed.append(self._mixed_joiner(layouts))
            return Admission(mixed[0](running).requests, hooks=self.mixer(layouts))

        return join

    def _should_turn_mixed(self, model: str, served: ServedDelta | None, room: int) -> bool:
        """Lock held: `auto`, `model` can run mixed, and other mixable models wait enough to join."""
        if self.policy.mode != "auto" or self.mixer is None or model in self._unmixable:
            return False
        if served is not None and (served.mixed is None or not self.policy.mixable(served.mixed)):
            return False
        others = [m for m in self._mixable_ready() if m != model]
        if not others or not self._worth_joining([self._queues[m] for m in others], room):
            return False
        queued = {m: len(self._queues[m]) for m in others} | {model: len(self._queues.get(model, ()))}
        return self.policy.merged_model(model, queued, self.max_batch_size, False) is None

    def _mixed_joiner(self, layouts: dict[str, MixedDelta | None]) -> Joiner:
        """The oldest requests of any mixable model already read from disk join a mixed batch; `layouts`
        (which the batch's hooks read) gains their models."""

        def join(running: int) -> Admission:
            room = self.max_batch_size - running
            with self._cond:
                if room <= 0 or not self._may_join():
                    return Admission()
                models = self._mixable_ready()
                if not models or not self._worth_joining([self._queues[m] for m in models], room):
                    return Admission()
                queued = {m: len(self._queues[m]) for m in models}
                if self.policy.merged_model(self._pick(models), queued, self.max_batch_size, False):
                    return Admission()  # one model now fills a batch: let this one drain, then merge it
                taken = self._take_oldest(models, room)
            self._admitted(taken)
            joined = self._resolve_layouts(taken, layouts)
            for model in {r.model for r in joined}:
                self.metrics.batches.labels(model).inc()
            return Admission(joined)

        return join


def _run_control(fn: Callable[[], object], future: Future[object]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - not swallowed: the caller re-raises it from the future
        future.set_exception(exc)
    else:
        future.set_result(result)
