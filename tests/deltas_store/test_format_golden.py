"""Golden tests of the delta file layout: the format is a contract that other tools and old files rely on.

They pin structure (key names, dtypes, metadata keys, manifest fields, the digest and index encodings),
never the random values of the tiny test models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltas_store.checkpoint import ModelDir
from deltas_store.compression.pipeline import CompressOptions, compress
from deltas_store.compression.sparsify import seeded_keep_indices
from deltas_store.fingerprint import base_fingerprint
from deltas_store.format.encoding import decode_varint_gaps, encode_varint_gaps
from deltas_store.format.io import Delta, DenseParam, SparseParam, read_delta, read_manifest, write_delta
from deltas_store.format.manifest import BaseInfo, Manifest, ParamEntry
from tests.models import cast_dir

MANIFEST_TOP_KEYS = {
    "format",
    "format_version",
    "name",
    "created",
    "deltaserve_version",
    "base",
    "finetune_id",
    "finetune_architecture",
    "finetune_config",
    "method",
    "drop_rate",
    "q",
    "seed",
    "value_dtype",
    "prune_scope",
    "base_prefix",
    "finetune_prefix",
    "params",
    "unchanged",
    "calibration",
    "data_sha256",
}
PARAM_KEYS = {"kind", "shape", "dtype", "nnz", "encoding", "density", "scale", "base_name"}
BASE_KEYS = {"id", "architecture", "fingerprint", "num_tensors", "num_params"}
CALIBRATION_KEYS = {"metric", "score", "source", "grid", "details"}
METADATA_KEYS = {"deltaserve.manifest", "deltaserve.manifest_sha256"}
# safetensors dtype tags as they appear in the file header, and the names the digest uses for them.
TAGS = {
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
    "F64": "float64",
    "U8": "uint8",
    "I32": "int32",
}


def raw_file(path: Path) -> tuple[dict[str, Any], dict[str, str], bytes]:
    """(tensor entries of the JSON header, its __metadata__, the data buffer), parsed by hand."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8 : 8 + n])
    metadata = head.pop("__metadata__")
    return head, metadata, data[8 + n :]


def data_digest_by_hand(head: dict[str, Any], buffer: bytes) -> str:
    """The documented data digest, reimplemented from the raw file: sha256 over the sorted keys of
    `key|dtype|shape|` followed by the tensor's little-endian bytes."""
    h = hashlib.sha256()
    for key in sorted(head):
        entry = head[key]
        shape = tuple(entry["shape"])
        start, end = entry["data_offsets"]
        h.update(f"{key}|{TAGS[str(entry['dtype'])]}|{shape}|".encode())
        h.update(buffer[start:end])
    return h.hexdigest()


@pytest.fixture(scope="module")
def golden(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The fixed tiny delta: tiny llama, dare, p = 0.9, seed 0."""
    out = tmp_path_factory.mktemp("golden") / "golden.safetensors"
    opts = CompressOptions(
        tiny_llama_dir, tiny_llama_finetunes["ft-0"], out, method="dare", drop_rate=0.9, seed=0
    )
    return compress(opts).path


@pytest.fixture(scope="module")
def llama_names(tiny_llama_dir: Path) -> dict[str, tuple[int, ...]]:
    with ModelDir.open(tiny_llama_dir) as base:
        return {n: base.info(n).shape for n in base.names()}


def test_golden_tensor_keys_and_dtypes(golden: Path, llama_names: dict[str, tuple[int, ...]]) -> None:
    head, _, _ = raw_file(golden)
    assert len(llama_names) == 21
    # Seeded masks store no index data: one `P::values` per parameter and nothing else.
    assert set(head) == {f"{n}::values" for n in llama_names}
    manifest = json.loads(raw_file(golden)[1]["deltaserve.manifest"])
    for name in llama_names:
        entry = head[f"{name}::values"]
        assert entry["dtype"] == "F32"  # the fine-tune's dtype
        assert entry["shape"] == [manifest["params"][name]["nnz"]]  # 1-D


def test_golden_metadata(golden: Path, tiny_llama_dir: Path) -> None:
    head, metadata, buffer = raw_file(golden)
    assert set(metadata) == METADATA_KEYS
    raw = metadata["deltaserve.manifest"]
    assert metadata["deltaserve.manifest_sha256"] == hashlib.sha256(raw.encode()).hexdigest()
    manifest = json.loads(raw)
    assert manifest["data_sha256"] == data_digest_by_hand(head, buffer)
    with ModelDir.open(tiny_llama_dir) as base:
        assert manifest["base"]["fingerprint"] == base_fingerprint(base)
        assert manifest["base"]["num_tensors"] == len(base.names())


def test_golden_manifest(golden: Path, llama_names: dict[str, tuple[int, ...]]) -> None:
    manifest = json.loads(raw_file(golden)[1]["deltaserve.manifest"])
    assert set(manifest) == MANIFEST_TOP_KEYS
    assert manifest["format"] == "deltaserve.delta"
    assert manifest["format_version"] == 1
    assert set(manifest["base"]) == BASE_KEYS
    assert manifest["base"]["fingerprint"].startswith("sha256:")
    assert manifest["base"]["architecture"] == "LlamaForCausalLM"
    assert manifest["base"]["num_params"] == sum(torch.Size(s).numel() for s in llama_names.values())
    assert manifest["finetune_architecture"] == "LlamaForCausalLM"
    assert manifest["finetune_config"]["model_type"] == "llama"
    expected = {
        "name": "golden",
        "method": "dare",
        "drop_rate": 0.9,
        "q": None,
        "seed": 0,
        "value_dtype": "float32",
        "prune_scope": "all",
        "base_prefix": "",
        "finetune_prefix": "",
        "unchanged": [],
        "calibration": None,
    }
    assert {k: manifest[k] for k in expected} == expected
    assert len(manifest["data_sha256"]) == 64 and int(manifest["data_sha256"], 16) >= 0
    assert set(manifest["params"]) == set(llama_names)
    for name, entry in manifest["params"].items():
        assert set(entry) == PARAM_KEYS
        numel = torch.Size(llama_names[name]).numel()
        mask = seeded_keep_indices(numel, entry["density"], 0, name)
        assert entry == {
            "kind": "sparse",
            "shape": list(llama_names[name]),
            "dtype": "float32",
            "nnz": mask.numel(),
            "encoding": "seeded",
            "density": pytest.approx(0.1),
            "scale": pytest.approx(10.0),
            "base_name": None,
        }


def test_golden_magnitude_and_dense_keys(
    tiny_llama_dir: Path,
    tiny_llama_finetunes: dict[str, Path],
    llama_names: dict[str, tuple[int, ...]],
    tmp_path: Path,
) -> None:
    """Index data for magnitude masks (`P::gaps`, uint8 LEB128) and whole parameters (`P::dense`)."""
    ft = cast_dir(tiny_llama_finetunes["ft-0"], tmp_path / "ft-bf16", torch.bfloat16)
    base = cast_dir(tiny_llama_dir, tmp_path / "base-bf16", torch.bfloat16)
    opts = CompressOptions(
        base,
        ft,
        tmp_path / "m.safetensors",
        method="magnitude",
        drop_rate=0.9,
        keep_dense=(r"norm\.weight$",),
    )
    path = compress(opts).path
    head, _, _ = raw_file(path)
    dense = {n for n in llama_names if n.endswith("norm.weight")}
    sparse = set(llama_names) - dense
    assert dense and sparse
    assert set(head) == (
        {f"{n}::values" for n in sparse} | {f"{n}::gaps" for n in sparse} | {f"{n}::dense" for n in dense}
    )
    manifest = read_manifest(path)
    assert manifest.value_dtype == "bfloat16"
    for n in sparse:
        assert head[f"{n}::values"]["dtype"] == "BF16"
        assert head[f"{n}::gaps"]["dtype"] == "U8"
        e = manifest.params[n]
        assert (e.kind, e.encoding, e.dtype, e.density, e.scale) == (
            "sparse",
            "varint_gaps",
            "bfloat16",
            None,
            1.0,
        )
    for n in dense:
        assert head[f"{n}::dense"]["dtype"] == "BF16"
        assert head[f"{n}::dense"]["shape"] == list(llama_names[n])
        e = manifest.params[n]
        assert (e.kind, e.encoding, e.nnz) == ("dense", "dense", torch.Size(llama_names[n]).numel())


# ---------------------------------------------------------------------------------------------- encodings


def test_varint_gaps_bytes_are_pinned() -> None:
    """LEB128 of (gap - 1): consecutive indices cost one zero byte, a 2**14 gap costs three bytes."""
    indices = torch.tensor([0, 1, 129, 129 + 1 + 2**14, 129 + 1 + 2**14 + 1 + 2**21])
    data = encode_varint_gaps(indices)
    assert data.dtype == torch.uint8
    assert data.tolist() == [0, 0, 127, 0x80, 0x80, 1, 0x80, 0x80, 0x80, 1]
    assert torch.equal(decode_varint_gaps(data, 5, 2**23), indices)


def test_seeded_mask_is_pinned() -> None:
    """Seeded deltas store no indices: the mask generator *is* the format. A change to it silently
    re-targets every seeded delta ever written, so its output is pinned here."""
    idx = seeded_keep_indices(4096, 0.1, 0, "model.layers.0.mlp.up_proj.weight")
    assert idx.dtype == torch.int64
    assert idx.numel() == 404
    assert idx[:12].tolist() == [5, 13, 24, 55, 59, 75, 81, 89, 93, 120, 127, 129]
    digest = hashlib.sha256(idx.numpy().astype("<i8").tobytes()).hexdigest()
    assert digest == "35092c5ffaf46f2b7f4e69694d3df0bbc9da883502edcf502e3bca3aea402798"
    assert seeded_keep_indices(1000, 0.5, 123, "w")[:12].tolist() == [
        0,
        2,
        3,
        6,
        7,
        9,
        13,
        14,
        16,
        18,
        21,
        22,
    ]


# ---------------------------------------------------------------------------------------------- round trip


def handmade_delta() -> Delta:
    """One parameter per encoding (seeded, varint_gaps, indices_i32, dense), in several dtypes."""
    gen = torch.Generator().manual_seed(0)
    seeded_idx = seeded_keep_indices(24 * 8, 0.25, 3, "a.seeded")
    gaps_idx = torch.tensor([0, 1, 2, 50, 51, 199, 200, 4095])
    i32_idx = torch.tensor([3, 17, 18, 63])
    sparse = {
        "a.seeded": SparseParam((24, 8), seeded_idx, torch.randn(seeded_idx.numel(), generator=gen)),
        "b.gaps": SparseParam((64, 64), gaps_idx, torch.randn(8, generator=gen)),
        "c.i32": SparseParam((64,), i32_idx, torch.randn(4, generator=gen)),
    }
    dense = {"d.head": DenseParam(torch.randn(3, 5, generator=gen))}
    params = {
        "a.seeded": ParamEntry(
            kind="sparse",
            shape=(24, 8),
            dtype="float32",
            nnz=seeded_idx.numel(),
            encoding="seeded",
            density=0.25,
        ),
        "b.gaps": ParamEntry(kind="sparse", shape=(64, 64), dtype="float32", nnz=8, encoding="varint_gaps"),
        "c.i32": ParamEntry(kind="sparse", shape=(64,), dtype="float32", nnz=4, encoding="indices_i32"),
        "d.head": ParamEntry(kind="dense", shape=(3, 5), dtype="float32", nnz=15, encoding="dense"),
    }
    manifest = Manifest(
        name="roundtrip",
        created="2024-01-01T00:00:00+00:00",
        deltaserve_version="0.0.0",
        base=BaseInfo(id="b", architecture=None, fingerprint="sha256:0", num_tensors=3, num_params=4352),
        finetune_id="f",
        finetune_architecture=None,
        method="dare",
        drop_rate=0.75,
        seed=3,
        value_dtype="float32",
        prune_scope="all",
        params=params,
        data_sha256="",
    )
    return Delta(manifest, sparse, dense)


def assert_same_delta(got: Delta, want: Delta) -> None:
    assert set(got.sparse) == set(want.sparse) and set(got.dense) == set(want.dense)
    for name, sp in want.sparse.items():
        assert got.sparse[name].shape == sp.shape
        assert torch.equal(got.sparse[name].indices, sp.indices), name
        assert got.sparse[name].values.dtype == sp.values.dtype
        assert torch.equal(got.sparse[name].values, sp.values), name
    for name, dp in want.dense.items():
        assert got.dense[name].value.dtype == dp.value.dtype
        assert torch.equal(got.dense[name].value, dp.value), name


def test_write_then_read_is_identity(tmp_path: Path) -> None:
    delta = handmade_delta()
    path = write_delta(delta, tmp_path / "rt.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt.safetensors"]  # no temp file left
    back = read_delta(path)
    assert_same_delta(back, delta)
    assert back.manifest == delta.manifest.model_copy(update={"data_sha256": back.manifest.data_sha256})
    head, _, buffer = raw_file(path)
    assert back.manifest.data_sha256 == data_digest_by_hand(head, buffer)
    keys = ["a.seeded::values", "b.gaps::values", "b.gaps::gaps", "c.i32::values", "c.i32::indices"]
    assert set(head) == {*keys, "d.head::dense"}
    assert head["c.i32::indices"]["dtype"] == "I32"
    # Writing what was read gives the same bytes' worth of tensors and the same digest.
    again = write_delta(back, tmp_path / "again.safetensors")
    assert read_manifest(again).data_sha256 == back.manifest.data_sha256


def test_compressed_delta_round_trips(golden: Path, tmp_path: Path) -> None:
    delta = read_delta(golden)
    copy = write_delta(delta, tmp_path / "copy.safetensors")
    assert_same_delta(read_delta(copy), delta)
    assert load_file(copy).keys() == load_file(golden).keys()


def test_mixed_dtype_checkpoint_round_trips(
    tiny_llama_dir: Path, tiny_llama_finetunes: dict[str, Path], tmp_path: Path
) -> None:
    """A checkpoint that keeps some tensors in fp32 and others in bf16: each keeps its own value dtype."""

    def mixed(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        file = dst / "model.safetensors"
        tensors = {k: v.to(torch.bfloat16) if "proj" in k else v for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
        return dst

    base = mixed(tiny_llama_dir, tmp_path / "base")
    ft = mixed(tiny_llama_finetunes["ft-0"], tmp_path / "ft")
    path = compress(CompressOptions(base, ft, tmp_path / "mixed.safetensors", method="dare")).path
    head, _, _ = raw_file(path)
    delta = read_delta(path)
    assert delta.manifest.value_dtype == "mixed"
    for name, sp in delta.sparse.items():
        want = torch.bfloat16 if "proj" in name else torch.float32
        assert sp.values.dtype == want
        assert head[f"{name}::values"]["dtype"] == ("BF16" if want == torch.bfloat16 else "F32")
        assert delta.manifest.params[name].dtype == str(want).removeprefix("torch.")
