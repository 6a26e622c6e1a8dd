"""One generation request as the engine sees it: prompt ids, sampling parameters, and where results go."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; temperature 0 means greedy (argmax), bit-compatible with transformers' greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past EOS (benchmarks: fixed-length outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Finished:
    """What a request ended with: the full text, why it stopped, and its token counts."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class RequestSink(Protocol):
    """Receives a request's results; called from the engine's worker thread, so it must not block."""

    def on_start(self) -> None:
        """The request's batch was prefilled (its first token is next): time to first token."""

    def on_text(self, text: str) -> None:
        """New text (already stop-string safe); concatenated it equals the final text."""

    def on_finish(self, result: Finished) -> None:
        """The request ended normally; nothing follows."""

    def on_error(self, error: BaseException) -> None:
        """The request failed; nothing follows."""


@dataclass(eq=False)
class GenerationRequest:
    """A prompt for one model, queued by the scheduler and run by the engine."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: RequestSink
    enqueued_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop work on this request at the next decode step (or drop it from the queue)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()
