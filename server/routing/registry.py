"""Which models are served: the base under its id, and every delta in the store under its name."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from deltas_store import DeltaNotFoundError, DeltaStore, InvalidNameError, StoredDelta
from server.errors import ModelNotFoundError
from server.routing.cache import CacheKey


@dataclass(frozen=True)
class ModelRef:
    """A resolved model name: the base (stored is None) or one stored version of a delta."""

    name: str
    stored: StoredDelta | None

    @property
    def key(self) -> CacheKey | None:
        return None if self.stored is None else (self.stored.name, self.stored.version)


class Registry:
    """Resolves `model` fields. The store is read on each call, so deltas put by another process appear too.

    A delta being deleted is *retiring*: new requests get 404 while queued ones still resolve it.

    Example:
        >>> registry.resolve("math").stored.version  # doctest: +SKIP
        2
    """

    def __init__(self, base_id: str, store: DeltaStore) -> None:
        self.base_id = base_id
        self.store = store
        self._retiring: set[str] = set()
        self._lock = threading.Lock()

    def resolve(self, model: str, *, include_retiring: bool = False) -> ModelRef:
        """The base or the latest version of delta `model`; ModelNotFoundError lists what is served."""
        if model == self.base_id:
            return ModelRef(model, None)
        with self._lock:
            retiring = model in self._retiring
        if not retiring or include_retiring:
            try:
                return ModelRef(model, self.store.get(model))
            except (DeltaNotFoundError, InvalidNameError):
                pass
        raise ModelNotFoundError(self._not_found_message(model), param="model")

    def deltas(self) -> list[StoredDelta]:
        """The latest version of every served delta, by name."""
        with self._lock:
            retiring = set(self._retiring)
        return [d for d in self.store.list() if d.name not in retiring]

    def names(self) -> list[str]:
        return [self.base_id, *(d.name for d in self.deltas())]

    @contextmanager
    def retiring(self, name: str) -> Iterator[None]:
        """While inside, `name` is refused to new requests (it is being deleted)."""
        with self._lock:
            self._retiring.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._retiring.discard(name)

    def _not_found_message(self, model: str) -> str:
        names = self.names()
        shown = ", ".join(repr(n) for n in names[:10]) + (
            f" and {len(names) - 10} more" if len(names) > 10 else ""
        )
        return f"model {model!r} not found; served models: {shown}"
