"""deltas_store: turn fine-tunes into compact DARE/DAREx sparse deltas, store them, and apply them exactly.

The public API is exported lazily (PEP 562), so `import deltas_store.cli` stays cheap and torch is
imported only when a tensor-level name is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # errors
    "DeltaStoreError": "deltas_store.errors",
    "ModelDirError": "deltas_store.errors",
    "UnsafeCheckpointError": "deltas_store.errors",
    "ArchitectureMismatchError": "deltas_store.errors",
    "DeltaFormatError": "deltas_store.errors",
    "BaseMismatchError": "deltas_store.errors",
    "UnknownMethodError": "deltas_store.errors",
    "InvalidNameError": "deltas_store.errors",
    "DeltaNotFoundError": "deltas_store.errors",
    "CalibrationError": "deltas_store.errors",
    "StoreCorruptedError": "deltas_store.errors",
    "AdapterError": "deltas_store.errors",
    # checkpoints and fingerprints
    "ModelDir": "deltas_store.checkpoint",
    "base_fingerprint": "deltas_store.fingerprint",
    "embedded_base_dir": "deltas_store.embedded",
    "EMBEDDED_ID": "deltas_store.embedded",
    # the file format
    "Delta": "deltas_store.format.io",
    "SparseParam": "deltas_store.format.io",
    "DenseParam": "deltas_store.format.io",
    "read_delta": "deltas_store.format.io",
    "read_manifest": "deltas_store.format.io",
    "write_delta": "deltas_store.format.io",
    "manifest_summary": "deltas_store.format.io",
    "Manifest": "deltas_store.format.manifest",
    # patching
    "PreparedDelta": "deltas_store.patching",
    "SavedOriginals": "deltas_store.patching",
    "check_base": "deltas_store.patching",
    "prepare_delta": "deltas_store.patching",
    "apply_delta_": "deltas_store.patching",
    "restore_": "deltas_store.patching",
    # compression
    "CompressOptions": "deltas_store.compress",
    "compress": "deltas_store.compress",
    "METHODS": "deltas_store.compression.registry",
    "AdamR": "deltas_store.adamr",
    "LoraFinetune": "deltas_store.lora",
    # applying to a model directory
    "apply_to_dir": "deltas_store.apply",
    # the store
    "DeltaStore": "deltas_store.store",
    "StoredDelta": "deltas_store.store",
    "validate_name": "deltas_store.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltas_store' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
