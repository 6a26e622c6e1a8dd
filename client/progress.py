"""A dependency-free one-line progress bar for uploads, drawn only on a terminal."""

from __future__ import annotations

from typing import TextIO


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


class ProgressBar:
    """Called as `bar(done, total)` (bytes); redraws one line only when the shown percent changes.

    Example:
        >>> bar = ProgressBar("upload", sys.stderr)
        >>> client.upload_delta("d.safetensors", "d", progress=bar)
        >>> bar.close()
    """

    def __init__(self, label: str, stream: TextIO, width: int = 30) -> None:
        self._label = label
        self._stream = stream
        self._width = width
        self._shown: int | None = None

    def __call__(self, done: int, total: int) -> None:
        percent = 100 if total <= 0 else min(100, done * 100 // total)
        if percent == self._shown:
            return
        self._shown = percent
        filled = self._width * percent // 100
        bar = "#" * filled + "-" * (self._width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {percent:3d}% {_mib(done)}/{_mib(total)} MiB")
        self._stream.flush()

    def close(self) -> None:
        """End the bar's line (nothing to do if it never drew)."""
        if self._shown is not None:
            self._stream.write("\n")
            self._stream.flush()


def terminal_progress(label: str, stream: TextIO, *, quiet: bool) -> ProgressBar | None:
    """A bar on `stream` when it is a terminal and not `quiet`; None (silent) otherwise."""
    if quiet or not stream.isatty():
        return None
    return ProgressBar(label, stream)
