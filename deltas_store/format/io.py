"""Reading and writing delta files: safetensors tensors + a manifest, verified before use."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltas_store.errors import DeltaFormatError
from deltas_store.format import encoding as enc
from deltas_store.format.manifest import (
    MANIFEST_DIGEST_KEY,
    MANIFEST_KEY,
    Manifest,
    ParamEntry,
    parse_manifest,
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise DeltaFormatError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})") from None


@dataclass(frozen=True)
class SparseParam:
    """Kept delta entries of one parameter: values[i] is added at flat position indices[i]."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # (nnz,) int64, strictly increasing
    values: torch.Tensor  # (nnz,) value dtype; already multiplied by the method's scale


@dataclass(frozen=True)
class DenseParam:
    """A parameter stored whole: it replaces the base's (new heads, resized embeddings, kept dense)."""

    value: torch.Tensor


@dataclass(frozen=True)
class Delta:
    manifest: Manifest
    sparse: dict[str, SparseParam] = field(default_factory=dict)
    dense: dict[str, DenseParam] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def nbytes(self) -> int:
        sparse = sum(p.indices.nbytes + p.values.nbytes for p in self.sparse.values())
        return sparse + sum(p.value.nbytes for p in self.dense.values())


def _data_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode_tensors(delta: Delta) -> dict[str, torch.Tensor]:
    """The safetensors payload of a delta, following the encodings its manifest names."""
    tensors: dict[str, torch.Tensor] = {}
    for name, sp in delta.sparse.items():
        entry = delta.manifest.params[name]
        tensors[f"{name}::values"] = sp.values.contiguous().cpu()
        if entry.encoding == enc.VARINT_GAPS:
            tensors[f"{name}::gaps"] = enc.encode_varint_gaps(sp.indices)
        elif entry.encoding == enc.INDICES_I32:
            tensors[f"{name}::indices"] = sp.indices.to(torch.int32).cpu()
        elif entry.encoding in enc.LINE_ENCODINGS:
            tensors[f"{name}::{entry.encoding}"] = enc.encode_lines(sp.indices, entry.shape, entry.encoding)
    for name, dp in delta.dense.items():
        tensors[f"{name}::dense"] = dp.value.contiguous().cpu()
    return tensors


def write_delta(delta: Delta, path: Path) -> Path:
    """Write atomically: temp file in the same directory, fsync, rename; the manifest's digest is filled in.

    Returns the path. A crash at any point leaves either no file or the complete file.
    """
    tensors = encode_tensors(delta)
    manifest = delta.manifest.model_copy(update={"data_sha256": _data_digest(tensors)})
    raw = manifest.model_dump_json()
    metadata = {MANIFEST_KEY: raw, MANIFEST_DIGEST_KEY: hashlib.sha256(raw.encode()).hexdigest()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def read_manifest(path: Path) -> Manifest:
    """The manifest alone (header only, no tensor data read), integrity-checked."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeltaFormatError(f"{path}: not a readable safetensors delta file ({exc})") from None
    return _manifest_from_metadata(metadata, path)


def _manifest_from_metadata(metadata: Mapping[str, str], path: Path) -> Manifest:
    raw = metadata.get(MANIFEST_KEY)
    if raw is None:
        raise DeltaFormatError(f"{path}: safetensors file without a deltaserve manifest (not a delta)")
    if hashlib.sha256(raw.encode()).hexdigest() != metadata.get(MANIFEST_DIGEST_KEY):
        raise DeltaFormatError(f"{path}: the manifest is corrupted (checksum mismatch)")
    return parse_manifest(raw)


def _expected_keys(
    name: str, entry: ParamEntry, value_dtype: str
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    if entry.kind == "dense":
        return {f"{name}::dense": (to_dtype(entry.dtype), entry.shape)}
    # Kept values are in the manifest's value dtype; a checkpoint of mixed dtypes keeps each parameter's own.
    values = to_dtype(entry.dtype if value_dtype == "mixed" else value_dtype)
    keys: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {f"{name}::values": (values, (entry.nnz,))}
    if entry.encoding == enc.VARINT_GAPS:
        keys[f"{name}::gaps"] = (torch.uint8, (-1,))
    elif entry.encoding == enc.INDICES_I32:
        keys[f"{name}::indices"] = (torch.int32, (entry.nnz,))
    elif entry.encoding in enc.LINE_ENCODINGS:
        keys[f"{name}::{entry.encoding}"] = (torch.int32, (-1,))
    return keys


def read_delta(path: Path, device: torch.device | str = "cpu") -> Delta:
    """Load and fully verify a delta file: manifest checksum, keys, shapes, dtypes, data digest, index bounds.

    Nothing in the file is trusted before it is checked; any problem raises DeltaFormatError.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            manifest = _manifest_from_metadata(fh.metadata() or {}, path)
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DeltaFormatError(f"{path}: not a readable safetensors delta file ({exc})") from None
    return decode_delta(manifest, tensors, path, device)


def decode_delta(
    manifest: Manifest, tensors: Mapping[str, torch.Tensor], where: Path | str, device: torch.device | str
) -> Delta:
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, entry in manifest.params.items():
        expected.update(_expected_keys(name, entry, manifest.value_dtype))
    if set(expected) != set(tensors):
        missing = sorted(set(expected) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(expected))[:3]
        raise DeltaFormatError(
            f"{where}: tensors do not match the manifest (missing {missing}, extra {extra})"
        )
    for key, (want_dtype, shape) in expected.items():
        t = tensors[key]
        if t.dtype != want_dtype or (shape != (-1,) and tuple(t.shape) != shape):
            raise DeltaFormatError(
                f"{where}: {key} is {dtype_name(t.dtype)}{tuple(t.shape)}, "
                f"the manifest says {dtype_name(want_dtype)}{shape}"
            )
    if _data_digest(tensors) != manifest.data_sha256:
        raise DeltaFormatError(f"{where}: tensor data is corrupted (checksum mismatch)")
    sparse: dict[str, SparseParam] = {}
    dense: dict[str, DenseParam] = {}
    for name, entry in manifest.params.items():
        if entry.kind == "dense":
            dense[name] = DenseParam(tensors[f"{name}::dense"].to(device))
            continue
        numel = 1
        for d in entry.shape:
            numel *= d
        if entry.nnz > numel:
            raise DeltaFormatError(f"{where}: {name} keeps {entry.nnz} values of {numel}")
        if entry.encoding == enc.SEEDED:
            if entry.density is None:
                raise DeltaFormatError(f"{where}: {name} is seeded but has no density")
            indices = enc.regenerate_seeded(entry.nnz, numel, entry.density, manifest.seed, name)
        elif entry.encoding == enc.SEEDED_BLOCKS:
            if entry.density is None or entry.block is None:
                raise DeltaFormatError(f"{where}: {name} is seeded in blocks but has no density or block")
            indices = enc.regenerate_seeded(entry.nnz, numel, entry.density, manifest.seed, name, entry.block)
        elif entry.encoding == enc.VARINT_GAPS:
            indices = enc.decode_varint_gaps(tensors[f"{name}::gaps"], entry.nnz, numel)
        elif entry.encoding == enc.INDICES_I32:
            indices = enc.decode_indices_i32(tensors[f"{name}::indices"], entry.nnz, numel)
        elif entry.encoding in enc.LINE_ENCODINGS:
            indices = enc.decode_lines(
                tensors[f"{name}::{entry.encoding}"], entry.nnz, entry.shape, entry.encoding
            )
        else:
            raise DeltaFormatError(f"{where}: {name} has unknown encoding {entry.encoding!r}")
        sparse[name] = SparseParam(entry.shape, indices.to(device), tensors[f"{name}::values"].to(device))
    return Delta(manifest, sparse, dense)


def manifest_summary(manifest: Manifest, file_size: int) -> dict[str, object]:
    """A small JSON-able summary (inspect, the store index, the REST API)."""
    total = sum(_numel(e.shape) for e in manifest.params.values())
    kept = sum(e.nnz for e in manifest.params.values())
    qs = sorted({1.0 / e.scale for e in manifest.params.values() if e.scale}) if manifest.q is None else []
    return {
        "name": manifest.name,
        "base_id": manifest.base.id,
        "method": manifest.method,
        "drop_rate": manifest.drop_rate,
        "q": manifest.q,
        # per-layer q (Algorithm 3): no single q, one per tensor; their range
        "q_per_tensor": f"{qs[0]:.4g}..{qs[-1]:.4g}" if len(qs) > 1 else None,
        "seed": manifest.seed,
        "value_dtype": manifest.value_dtype,
        "params": len(manifest.params),
        "kept_values": kept,
        "changed_values": total,
        "density": kept / total if total else 0.0,
        "file_bytes": file_size,
        "bytes_per_kept_value": file_size / kept if kept else None,
        "calibration_score": manifest.calibration.score if manifest.calibration else None,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def manifest_json(manifest: Manifest) -> str:
    return json.dumps(manifest.model_dump(mode="json"), indent=2)
