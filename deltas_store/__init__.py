"""deltas_store: turn fine-tunes into compact DARE/DAREx sparse deltas, store them, and apply them exactly.

The public API is exported lazily (PEP 562), so `import deltas_store.cli` stays cheap and torch is
imported only when a tensor-level name is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # real imports for type checkers; at run time names resolve lazily below
    from deltas_store.adamr import AdamR as AdamR
    from deltas_store.apply import apply_to_dir as apply_to_dir
    from deltas_store.checkpoint import ModelDir as ModelDir
    from deltas_store.compression.pipeline import CompressOptions as CompressOptions
    from deltas_store.compression.pipeline import compress as compress
    from deltas_store.compression.registry import METHODS as METHODS
    from deltas_store.embedded import EMBEDDED_ID as EMBEDDED_ID
    from deltas_store.embedded import embedded_base_dir as embedded_base_dir
    from deltas_store.errors import AdapterError as AdapterError
    from deltas_store.errors import ArchitectureMismatchError as ArchitectureMismatchError
    from deltas_store.errors import BaseMismatchError as BaseMismatchError
    from deltas_store.errors import CalibrationError as CalibrationError
    from deltas_store.errors import DeltaFormatError as DeltaFormatError
    from deltas_store.errors import DeltaNotFoundError as DeltaNotFoundError
    from deltas_store.errors import DeltaStoreError as DeltaStoreError
    from deltas_store.errors import InvalidNameError as InvalidNameError
    from deltas_store.errors import ModelDirError as ModelDirError
    from deltas_store.errors import StoreCorruptedError as StoreCorruptedError
    from deltas_store.errors import UnknownMethodError as UnknownMethodError
    from deltas_store.errors import UnsafeCheckpointError as UnsafeCheckpointError
    from deltas_store.fingerprint import base_fingerprint as base_fingerprint
    from deltas_store.format.io import Delta as Delta
    from deltas_store.format.io import DenseParam as DenseParam
    from deltas_store.format.io import SparseParam as SparseParam
    from deltas_store.format.io import manifest_summary as manifest_summary
    from deltas_store.format.io import read_delta as read_delta
    from deltas_store.format.io import read_manifest as read_manifest
    from deltas_store.format.io import write_delta as write_delta
    from deltas_store.format.manifest import Manifest as Manifest
    from deltas_store.lora import LoraFinetune as LoraFinetune
    from deltas_store.patching import PreparedDelta as PreparedDelta
    from deltas_store.patching import SavedOriginals as SavedOriginals
    from deltas_store.patching import apply_delta_ as apply_delta_
    from deltas_store.patching import check_base as check_base
    from deltas_store.patching import prepare_delta as prepare_delta
    from deltas_store.patching import restore_ as restore_
    from deltas_store.store import DeltaStore as DeltaStore
    from deltas_store.store import StoredDelta as StoredDelta
    from deltas_store.store import validate_name as validate_name

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
    "CompressOptions": "deltas_store.compression.pipeline",
    "compress": "deltas_store.compression.pipeline",
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
