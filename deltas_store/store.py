"""The on-disk delta store: content-addressed object files plus a versioned, atomically replaced index."""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deltas_store.errors import DeltaNotFoundError, DeltaStoreError, InvalidNameError, StoreCorruptedError

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_OBJECT_RE = re.compile(r"[0-9a-f]{64}\.safetensors")
_CHUNK = 1 << 20
_MAX_SUMMARY_BYTES = 64 * 1024
# Temp files older than this are leftovers of a crashed writer. Younger ones may belong to another process
# writing to the same store right now (an upload in progress keeps bumping its mtime), so they are kept.
STALE_TMP_AGE_S = 3600.0


def validate_name(name: str) -> str:
    """Return ``name`` if it may name a delta, else raise InvalidNameError.

    >>> validate_name("math-v2.1")
    'math-v2.1'
    """
    if _NAME_RE.fullmatch(name) is None:
        raise InvalidNameError(
            f"invalid delta name {name!r}: use 1 to 128 characters from [A-Za-z0-9._-] (no path separators)"
        )
    if name[0] in ".-":
        raise InvalidNameError(f"invalid delta name {name!r}: it must not start with '.' or '-'")
    return name


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    created: float
    summary: dict[str, Any] = Field(default_factory=dict)


class _Index(BaseModel):
    """The schema of ``index.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    deltas: dict[str, list[_Entry]] = Field(default_factory=dict)

    @field_validator("deltas")
    @classmethod
    def _check_deltas(cls, deltas: dict[str, list[_Entry]]) -> dict[str, list[_Entry]]:
        for name, entries in deltas.items():
            try:
                validate_name(name)
            except InvalidNameError as exc:
                raise ValueError(str(exc)) from exc
            versions = [e.version for e in entries]
            if not versions or versions != sorted(set(versions)):
                raise ValueError(f"{name!r}: versions must be a non-empty increasing list, got {versions}")
        return deltas


@dataclass(frozen=True)
class StoredDelta:
    """One version of a named delta; ``path`` is its content-addressed object file (shared by equal files)."""

    name: str
    version: int
    sha256: str
    size: int
    created: float  # unix time
    path: Path
    summary: dict[str, Any]


class DeltaStore:
    """A directory of compressed delta files, safe against crashes and concurrent writers.

    Layout: ``objects/<sha256>.safetensors`` (immutable, content-addressed), ``index.json``
    (name -> versions, replaced atomically), ``tmp/`` (staging on the same filesystem), ``.lock``.
    Opening a store removes stale temp files and unreferenced objects left by a crashed writer; it raises
    StoreCorruptedError if ``index.json`` is unreadable.

    >>> store = DeltaStore(Path("/srv/deltas"))  # doctest: +SKIP
    >>> store.put("math", Path("math.safetensors"), summary={"method": "dare"}) == store.get("math")  # doctest: +SKIP
    True
    """

    def __init__(self, root: Path, *, stale_tmp_age_s: float = STALE_TMP_AGE_S) -> None:
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._index_path = self.root / "index.json"
        self._thread_lock = threading.Lock()
        self._index_cache: tuple[tuple[int, ...], _Index] | None = None
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(exist_ok=True)
        self._remove_stale_tmp(stale_tmp_age_s)
        with self._locked():
            self._collect_garbage(self._read_index())

    # --- reading: lock-free, index.json is only ever replaced whole ---

    def get(self, name: str, version: int | None = None) -> StoredDelta:
        """Return ``version`` of ``name`` (the latest if None), after checking its object file is there."""
        entries = self._entries(name)
        matches = entries[-1:] if version is None else [e for e in entries if e.version == version]
        if not matches:
            known = [e.version for e in entries]
            raise DeltaNotFoundError(f"delta {name!r} has no version {version} (versions: {known})")
        delta = self._stored(name, matches[0])
        try:
            actual = delta.path.stat().st_size
        except FileNotFoundError:
            raise StoreCorruptedError(f"object file of {name!r} v{delta.version} is missing") from None
        if actual != delta.size:
            raise StoreCorruptedError(
                f"object file of {name!r} v{delta.version} has {actual} bytes, the index says {delta.size}"
            )
        return delta

    def versions(self, name: str) -> builtins.list[StoredDelta]:
        """Every stored version of ``name``, oldest first."""
        return [self._stored(name, e) for e in self._entries(name)]

    def list(self) -> builtins.list[StoredDelta]:
        """The latest version of every name, sorted by name."""
        index = self._read_index()
        return [self._stored(name, index.deltas[name][-1]) for name in sorted(index.deltas)]

    def __contains__(self, name: object) -> bool:
        return (
            isinstance(name, str)
            and _NAME_RE.fullmatch(name) is not None
            and name in self._read_index().deltas
        )

    def verify(self, name: str, version: int | None = None) -> StoredDelta:
        """Re-hash the object file of ``name``; raise StoreCorruptedError if it is missing or altered."""
        delta = self.get(name, version)
        sha256, _ = _hash_file(delta.path)
        if sha256 != delta.sha256:
            raise StoreCorruptedError(
                f"object file of {name!r} v{delta.version} is corrupted: sha256 {sha256}, expected {delta.sha256}"
            )
        return delta

    # --- writing ---

    @contextlib.contextmanager
    def staging_file(self) -> Iterator[Path]:
        """Yield a fresh empty file in ``tmp/`` (fill it, then ``put(..., move=True)``); removed on exit."""
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="upload-", suffix=".part")
        os.close(fd)
        path = Path(tmp_name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def put(
        self, name: str, source: Path, *, summary: Mapping[str, Any] | None = None, move: bool = False
    ) -> StoredDelta:
        """Store ``source`` as the next version of ``name`` (version 1 if new) and return it.

        With ``move=True`` the source is taken over (renamed into ``tmp/``, or copied then removed across
        filesystems): do not reuse it after the call, whether or not it succeeds.
        """
        validate_name(name)
        summary_dict = _json_summary(summary)
        source = Path(source)
        if not source.is_file():
            raise DeltaStoreError(f"cannot store {name!r}: {source} is not a regular file")
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-", suffix=".part")
        os.close(fd)
        staged = Path(tmp_name)
        try:
            # Once staged, the bytes are ours: hash and object name come from this private file. A symlink
            # or a hard-linked file is copied, so no outside name can later alter the object in place.
            st = source.lstat()
            if move and stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and _rename_same_fs(source, staged):
                sha256, size = _hash_file(staged, fsync=True)
            else:
                sha256, size = _copy_hashing(source, staged)
                if move:
                    source.unlink()
            with self._locked():
                index = self._read_index()
                obj = self._object_path(sha256)
                staged.chmod(0o644)
                # Replacing an existing equal object keeps one file per content and heals a rotten copy.
                staged.replace(obj)
                _fsync_dir(self._objects)
                entries = index.deltas.get(name, [])
                version = entries[-1].version + 1 if entries else 1
                entry = _Entry(
                    version=version, sha256=sha256, size=size, created=time.time(), summary=summary_dict
                )
                try:
                    self._write_index(_Index(deltas={**index.deltas, name: [*entries, entry]}))
                except BaseException:
                    self._collect_garbage(index)  # drop the object again if nothing else refers to it
                    raise
            return self._stored(name, entry)
        finally:
            staged.unlink(missing_ok=True)

    def delete(self, name: str) -> builtins.list[StoredDelta]:
        """Remove every version of ``name`` and return them; objects no other name uses are deleted too."""
        validate_name(name)
        with self._locked():
            index = self._read_index()
            if name not in index.deltas:
                raise DeltaNotFoundError(f"no delta named {name!r} in the store")
            remaining = _Index(deltas={k: v for k, v in index.deltas.items() if k != name})
            self._write_index(remaining)
            self._collect_garbage(remaining)
        return [self._stored(name, e) for e in index.deltas[name]]

    # --- internals ---

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # The threading lock orders this process's threads; flock orders processes (released on close).
        with self._thread_lock, (self.root / ".lock").open("a") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            yield

    def _read_index(self) -> _Index:
        # index.json is only ever replaced whole (a rename onto it: a new file), so its stat identifies its
        # content, also under another process's writes: parse again only when the stat changed. The stat is
        # taken before the read, so a file replaced in between is parsed now and re-read on the next call.
        # (Reading and parsing cost ~0.5 ms; the scheduler resolves every queued model between decode steps.)
        try:
            st = self._index_path.stat()
            key = (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
            cached = self._index_cache
            if cached is not None and cached[0] == key:
                return cached[1]
            raw = self._index_path.read_bytes()
        except FileNotFoundError:
            return _Index()
        try:
            index = _Index.model_validate_json(raw)
        except ValidationError as exc:
            raise StoreCorruptedError(f"store index {self._index_path} is corrupt: {exc}") from exc
        self._index_cache = (key, index)  # _Index is frozen: sharing it between threads is safe
        return index

    def _write_index(self, index: _Index) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="index-", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(index.model_dump_json(indent=1).encode())
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self._index_path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.root)

    def _collect_garbage(self, index: _Index) -> None:
        """Delete object files ``index`` does not refer to; call with the lock held."""
        used = {e.sha256 for entries in index.deltas.values() for e in entries}
        removed = False
        for path in self._objects.iterdir():
            if _OBJECT_RE.fullmatch(path.name) and path.name[:64] not in used:
                path.unlink(missing_ok=True)
                removed = True
        if removed:
            _fsync_dir(self._objects)

    def _remove_stale_tmp(self, max_age_s: float) -> None:
        cutoff = time.time() - max_age_s
        for path in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if not path.is_dir() and path.lstat().st_mtime < cutoff:
                    path.unlink()

    def _entries(self, name: str) -> builtins.list[_Entry]:
        entries = self._read_index().deltas.get(validate_name(name))
        if entries is None:
            raise DeltaNotFoundError(f"no delta named {name!r} in the store")
        return entries

    def _object_path(self, sha256: str) -> Path:
        return self._objects / f"{sha256}.safetensors"

    def _stored(self, name: str, e: _Entry) -> StoredDelta:
        return StoredDelta(
            name, e.version, e.sha256, e.size, e.created, self._object_path(e.sha256), dict(e.summary)
        )


def _json_summary(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        text = json.dumps(dict(summary or {}), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DeltaStoreError(f"a delta summary must hold plain JSON values: {exc}") from exc
    if len(text) > _MAX_SUMMARY_BYTES:
        raise DeltaStoreError(f"a delta summary must be under {_MAX_SUMMARY_BYTES} bytes of JSON")
    out: dict[str, Any] = json.loads(text)
    return out


def _rename_same_fs(source: Path, dest: Path) -> bool:
    """Rename ``source`` onto ``dest``; False (nothing done) if they are on different filesystems."""
    try:
        source.replace(dest)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    return True


def _copy_hashing(source: Path, dest: Path) -> tuple[str, int]:
    """Copy ``source`` to ``dest`` and fsync it; return the copy's (sha256, size)."""
    digest, size = hashlib.sha256(), 0
    with source.open("rb") as src, dest.open("wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest(), size


def _hash_file(path: Path, *, fsync: bool = False) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
