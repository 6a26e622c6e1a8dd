"""An LRU of loaded deltas under a byte budget (on the base's device), keyed by (name, version)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from deltas_store import PreparedDelta
from server.routing.served import ServedDelta

CacheKey = tuple[str, int]  # (delta name, store version)
Entry = ServedDelta | PreparedDelta  # what the server serves from; a bare PreparedDelta is kept as well


class DeltaCache:
    """Prepared deltas, most recently used last; putting one evicts the least recently used over budget.

    A delta larger than the whole budget is not kept (it is still usable for the batch that loaded it).
    Thread-safe: the worker thread fills it, API threads read residency.

    Example:
        >>> cache = DeltaCache(budget_bytes=1 << 30)
        >>> cache.get(("math", 1)) is None
        True
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> Entry | None:
        with self._lock:
            prepared = self._entries.get(key)
            if prepared is not None:
                self._entries.move_to_end(key)
            return prepared

    def put(self, key: CacheKey, prepared: Entry) -> bool:
        """Cache `prepared`; returns False when it alone is over the budget (then nothing is evicted)."""
        with self._lock:
            if prepared.nbytes > self.budget_bytes:
                return False
            self._entries[key] = prepared
            self._entries.move_to_end(key)
            total = sum(p.nbytes for p in self._entries.values())
            while total > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                total -= evicted.nbytes
        return True

    def evict(self, name: str) -> None:
        """Forget every version of `name` (re-uploaded or deleted)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == name]:
                del self._entries[key]

    def cached(self) -> list[CacheKey]:
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._entries.values())

    def device_of(self, name: str) -> str | None:
        """Where a cached version of `name` lives ('cpu', 'cuda:0'), or None when it is not cached."""
        with self._lock:
            for (cached, _), prepared in self._entries.items():
                if cached == name:
                    return _device(prepared)
        return None


def _device(entry: Entry) -> str:
    if isinstance(entry, ServedDelta):
        return str(entry.device)
    return str(entry.ops[0].values.device) if entry.ops else "cpu"
