"""Compatibility checks of a delta against a base model directory (no weights touched)."""

from __future__ import annotations

from deltas_store.checkpoint import ModelDir
from deltas_store.errors import ArchitectureMismatchError
from deltas_store.format.io import Delta


def check_shapes(delta: Delta, base: ModelDir) -> None:
    """Every sparse tensor and every unchanged one must exist in the base with the recorded shape."""
    manifest = delta.manifest
    for name, entry in manifest.params.items():
        if entry.kind != "sparse":
            continue
        base_name = manifest.base_name(name)
        if base_name not in base:
            raise ArchitectureMismatchError(f"the base has no tensor {base_name} (needed by {name})")
        shape = base.info(base_name).shape
        if shape != tuple(entry.shape):
            raise ArchitectureMismatchError(f"{name}: the delta has shape {entry.shape}, the base {shape}")
    for name in manifest.unchanged:
        if manifest.base_name(name) not in base:
            raise ArchitectureMismatchError(f"the base has no tensor {manifest.base_name(name)}")
