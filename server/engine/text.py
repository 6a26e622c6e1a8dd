"""Incremental detokenization with stop strings: text is released only once no stop string can still match."""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"  # what a byte-level decoder shows for a multi-byte character cut in half


class TextStream:
    """Turns a growing list of token ids into text increments, cutting at the first stop string.

    Example:
        >>> ts = TextStream(lambda ids: "".join(chr(i) for i in ids), stop=("!",))
        >>> ts.push(ord("h")), ts.push(ord("i")), ts.push(ord("!")), ts.stopped, ts.text
        ('h', 'i', '', True, 'hi')
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        # Text this close to the end might be the start of a stop string: held back until it cannot be.
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the text so far (final once finished)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that became safe to show (maybe '')."""
        self.ids.append(token_id)
        text = self._decode(self.ids)
        if text.endswith(_INCOMPLETE):
            return ""
        self.text = text
        if self._stop:
            start = max(0, self._emitted - self._hold)
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = text[: max(min(hits), self._emitted)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(text) - self._hold)

    def finish(self) -> str:
        """The generation ended without a stop string: release everything that is left."""
        if not self.stopped:
            self.text = self._decode(self.ids)
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
