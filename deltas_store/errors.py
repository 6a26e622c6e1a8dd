"""Typed errors raised by deltas_store; the CLI and the server translate them at their edges."""

from __future__ import annotations


class DeltaStoreError(Exception):
    """Base class of every error deltas_store raises on purpose."""


class ModelDirError(DeltaStoreError):
    """A model directory is missing, is not a Hugging Face model dir, or cannot be read."""


class UnsafeCheckpointError(ModelDirError):
    """A checkpoint holds pickle files (.bin/.pt/.pth) and no safetensors: refused, never unpickled."""


class ArchitectureMismatchError(DeltaStoreError):
    """Base and fine-tune (or base and delta) do not describe compatible architectures."""


class DeltaFormatError(DeltaStoreError):
    """A delta file is malformed, truncated, corrupted, or holds out-of-range index data."""


class BaseMismatchError(DeltaStoreError):
    """A delta was made for another base model (names, shapes, dtypes or fingerprint differ)."""


class UnknownMethodError(DeltaStoreError):
    """No compression method of that name is registered."""


class InvalidNameError(DeltaStoreError):
    """A delta name is not allowed (allowed: [A-Za-z0-9._-], no path separators, not '.' or '..')."""


class DeltaNotFoundError(DeltaStoreError):
    """No delta of that name (or version) is in the store."""


class CalibrationError(DeltaStoreError):
    """Calibration data is missing, empty, or unusable for the q search."""


class StoreCorruptedError(DeltaStoreError):
    """The store's index is unreadable, or an object file is missing or does not match its recorded hash."""


class AdapterError(ModelDirError):
    """A PEFT adapter directory is malformed or uses a variant deltaserve cannot materialise (DoRA, ...)."""
