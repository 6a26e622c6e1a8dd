"""Prometheus metrics of one app, in its own CollectorRegistry (several apps may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SWAP_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """Request latency and TTFT histograms, queue depth, swaps and swap seconds, delta cache and residency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "deltaserve_request_seconds", "end-to-end latency of generation requests", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft_seconds = Histogram(
            "deltaserve_time_to_first_token_seconds", "time from arrival to the first generated token",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "deltaserve_requests", "finished generation requests", ["model", "finish_reason"], registry=r
        )
        self.generated_tokens = Counter("deltaserve_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge(
            "deltaserve_queue_depth", "requests waiting, per model", ["model"], registry=r
        )
        self.batches = Counter("deltaserve_batches", "batches run", ["model"], registry=r)
        self.mixed_batches = Counter(
            "deltaserve_mixed_batches", "batches that served several models at once (side terms)", registry=r
        )
        self.swaps = Counter("deltaserve_swaps", "weight swaps (a delta applied or restored)", registry=r)
        self.swap_seconds = Histogram(
            "deltaserve_swap_seconds", "time to patch or restore the resident weights", buckets=_SWAP_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.cache_bytes = Gauge(
            "deltaserve_delta_cache_bytes", "bytes of prepared deltas cached", registry=r
        )
        self.resident = Gauge(
            "deltaserve_delta_resident", "1 if the delta is cached in memory, 2 if patched in now", ["delta"],
            registry=r,
        )  # fmt: skip
        self.uploads = Counter("deltaserve_uploads", "delta uploads", ["outcome"], registry=r)
        # Batch occupancy: decode_rows / decode_steps is the mean batch a decode step served.
        self.decode_steps = Counter(
            "deltaserve_decode_steps",
            "decode forward passes (one token for every row of a batch)",
            registry=r,
        )
        self.decode_rows = Counter("deltaserve_decode_rows", "rows summed over decode steps", registry=r)
        self.prefills = Counter(
            "deltaserve_prefills", "prefill forward passes (a batch's start, or rows joining it)", registry=r
        )
        self.prefill_rows = Counter("deltaserve_prefill_rows", "rows summed over prefills", registry=r)
        # Time per forward pass (and token choice): their sums against the wall clock say how much of it the
        # model's passes take, and the rest is the server's own work.
        self.decode_step_seconds = Histogram(
            "deltaserve_decode_step_seconds", "time of one decode step (forward pass and token choice)",
            buckets=_STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.prefill_seconds = Histogram(
            "deltaserve_prefill_seconds", "time of one prefill (forward pass and first token choice)",
            buckets=_STEP_BUCKETS, registry=r,
        )  # fmt: skip

    def prefilled(self, rows: int, seconds: float) -> None:
        """The engine ran a prefill of `rows` rows in `seconds` (server.engine.generator.StepObserver)."""
        self.prefills.inc()
        self.prefill_rows.inc(rows)
        self.prefill_seconds.observe(seconds)

    def decoded(self, rows: int, seconds: float) -> None:
        """The engine ran a decode step of `rows` rows in `seconds`."""
        self.decode_steps.inc()
        self.decode_rows.inc(rows)
        self.decode_step_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
