"""Every bad input gets one clear, typed error (API) or one `error:` line and a non-zero exit (CLI), and
leaves nothing partial behind: no output file or directory, no stray temp files beside it."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from client.cli import main
from deltas_store.apply import apply_to_dir
from deltas_store.checkpoint import ModelDir
from deltas_store.compression.pipeline import CompressOptions, compress
from deltas_store.errors import (
    ArchitectureMismatchError,
    BaseMismatchError,
    DeltaFormatError,
    InvalidNameError,
    ModelDirError,
    UnknownMethodError,
    UnsafeCheckpointError,
)
from deltas_store.format import encoding as enc
from deltas_store.format.io import Delta, SparseParam, read_delta, read_manifest, write_delta
from deltas_store.format.manifest import BaseInfo, Encoding, Manifest, ParamEntry

DELTASERVE = Path(sys.executable).parent / "deltaserve"

# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_deltaserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """DELTASERVE_* variables of the developer's shell must not change what these tests see."""
    import os

    for key in list(os.environ):
        if key.startswith("DELTASERVE_"):
            monkeypatch.delenv(key)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """The real `deltaserve` entry function, in process (an uncaught exception fails the test)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc: int, err: str, *needles: str) -> str:
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def out_root(tmp_path: Path) -> Path:
    """An empty folder that receives the -o output; it must still be empty after every failure."""
    root = tmp_path / "out"
    root.mkdir()
    return root


def copy_model(src: Path, dst: Path, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dst


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length n, the safetensors JSON header); tensor data starts at byte 8 + n."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def make_delta(
    name: str,
    shape: tuple[int, ...],
    indices: list[int],
    *,
    encoding: Encoding = enc.INDICES_I32,
    nnz: int | None = None,
) -> Delta:
    """A one-parameter delta built by hand; write_delta fills in correct checksums."""
    numel = 1
    for d in shape:
        numel *= d
    entry = ParamEntry(
        kind="sparse",
        shape=shape,
        dtype="float32",
        nnz=len(indices) if nnz is None else nnz,
        encoding=encoding,
        scale=1.0,
    )
    manifest = Manifest(
        name="handmade",
        created="2024-01-01T00:00:00+00:00",
        deltaserve_version="0.0.0",
        base=BaseInfo(id="b", architecture=None, fingerprint="sha256:0", num_tensors=1, num_params=numel),
        finetune_id="f",
        finetune_architecture=None,
        method="magnitude",
        drop_rate=0.5,
        seed=0,
        value_dtype="float32",
        prune_scope="all",
        params={name: entry},
        data_sha256="",
    )
    values = torch.arange(len(indices), dtype=torch.float32) + 1.0
    return Delta(manifest, {name: SparseParam(shape, torch.tensor(indices, dtype=torch.int64), values)})


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ft_dir(tiny_llama_finetunes: dict[str, Path]) -> Path:
    return tiny_llama_finetunes["ft-0"]


@pytest.fixture(scope="module")
def deltas(tiny_llama_dir: Path, ft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good deltas of the tiny llama (written once; tests corrupt copies, never these)."""
    root = tmp_path_factory.mktemp("good-deltas")
    out = {}
    for method in ("dare", "magnitude"):
        opts = CompressOptions(
            tiny_llama_dir,
            ft_dir,
            root / f"{method}.safetensors",
            method=method,
            drop_rate=0.9,
            name="abcxyz",
        )
        out[method] = compress(opts).path
    return out


@pytest.fixture
def dare_copy(deltas: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copy2(deltas["dare"], tmp_path / "victim.safetensors"))


@pytest.fixture
def magnitude_copy(deltas: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copy2(deltas["magnitude"], tmp_path / "victim.safetensors"))


class _Detonator:
    """Unpickling this creates `marker`: proof that someone ran pickle on the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (Path.touch, (self.marker,))


@pytest.fixture
def pickle_dir(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A HF-looking dir (config, tokenizer) whose only weights are a booby-trapped pickle .bin."""
    model = copy_model(tiny_llama_dir, tmp_path / "pickled", drop=("*.safetensors*",))
    marker = tmp_path / "UNPICKLED"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Detonator(marker)))
    # The trap is live: unpickling a twin of the payload really creates its marker.
    twin = tmp_path / "twin-marker"
    pickle.loads(pickle.dumps(_Detonator(twin)))
    assert twin.exists()
    yield model, marker
    assert not marker.exists(), "a pickle checkpoint was unpickled"


# ---------------------------------------------------------------------------------------------- model dirs


def _no_config(src: Path, dst: Path) -> Path:
    return copy_model(src, dst, drop=("config.json",))


def _bad_json_config(src: Path, dst: Path) -> Path:
    copy_model(src, dst)
    (dst / "config.json").write_text("{not json")
    return dst


def _config_not_object(src: Path, dst: Path) -> Path:
    copy_model(src, dst)
    (dst / "config.json").write_text("[1, 2]")
    return dst


def _no_weights(src: Path, dst: Path) -> Path:
    return copy_model(src, dst, drop=("*.safetensors",))


def _garbage_weights(src: Path, dst: Path) -> Path:
    copy_model(src, dst)
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage")
    return dst


def _a_file(src: Path, dst: Path) -> Path:
    dst.write_text("not a directory")
    return dst


def _shard_outside(src: Path, dst: Path) -> Path:
    copy_model(src, dst)
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


NOT_HF_DIRS = {
    "no-config": _no_config,
    "bad-json-config": _bad_json_config,
    "config-not-object": _config_not_object,
    "no-weights": _no_weights,
    "garbage-weights": _garbage_weights,
    "a-file": _a_file,
    "shard-outside-dir": _shard_outside,
}


def test_missing_dir_is_a_model_dir_error(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="no such directory"):
        ModelDir.open(tmp_path / "nowhere")


@pytest.mark.parametrize("make", NOT_HF_DIRS.values(), ids=NOT_HF_DIRS.keys())
def test_not_a_hf_dir_is_a_model_dir_error(
    make: Callable[[Path, Path], Path], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    bad = make(tiny_llama_dir, tmp_path / "bad")
    with pytest.raises(ModelDirError), ModelDir.open(bad) as model:
        model.names()


@pytest.mark.parametrize("which", ["base", "finetuned"])
def test_cli_compress_missing_dir(
    which: str, tiny_llama_dir: Path, ft_dir: Path, out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = out_root.parent / "nowhere"
    base, ft = (missing, ft_dir) if which == "base" else (tiny_llama_dir, missing)
    out = out_root / "d.safetensors"
    rc, stdout, err = run_cli(capsys, "compress", base, ft, "-o", out, "--method", "dare")
    assert_one_error_line(rc, err, "nowhere", "no such directory")
    assert stdout == ""
    assert listing(out_root) == []


@pytest.mark.parametrize("kind", ["no-config", "no-weights", "a-file"])
def test_cli_compress_not_a_hf_dir(
    kind: str,
    tiny_llama_dir: Path,
    ft_dir: Path,
    out_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = NOT_HF_DIRS[kind](tiny_llama_dir, tmp_path / "bad")
    rc, _, err = run_cli(
        capsys, "compress", bad, ft_dir, "-o", out_root / "d.safetensors", "--method", "dare"
    )
    assert_one_error_line(rc, err, str(bad))
    assert listing(out_root) == []


def test_cli_apply_missing_base(
    deltas: dict[str, Path], out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run_cli(capsys, "apply", out_root.parent / "nowhere", deltas["dare"], "-o", out_root / "m")
    assert_one_error_line(rc, err, "no such directory")
    assert listing(out_root) == []


# ---------------------------------------------------------------------------------------------- pickle


def test_pickle_only_dir_is_refused_unopened(pickle_dir: tuple[Path, Path]) -> None:
    model, _ = pickle_dir
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        ModelDir.open(model)
    assert issubclass(UnsafeCheckpointError, ModelDirError)


@pytest.mark.parametrize("role", ["base", "finetuned"])
def test_cli_compress_refuses_pickle(
    role: str,
    pickle_dir: tuple[Path, Path],
    tiny_llama_dir: Path,
    ft_dir: Path,
    out_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, _ = pickle_dir
    base, ft = (model, ft_dir) if role == "base" else (tiny_llama_dir, model)
    # darex-q without --q loads the fine-tune with transformers for the q search: it must not get there.
    rc, _, err = run_cli(
        capsys, "compress", base, ft, "-o", out_root / "d.safetensors", "--method", "darex-q"
    )
    assert_one_error_line(rc, err, "pickle", "safetensors")
    assert listing(out_root) == []


def test_cli_apply_and_verify_refuse_pickle_base(
    pickle_dir: tuple[Path, Path],
    deltas: dict[str, Path],
    out_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, _ = pickle_dir
    rc, _, err = run_cli(capsys, "apply", model, deltas["dare"], "-o", out_root / "m")
    assert_one_error_line(rc, err, "pickle")
    rc, _, err = run_cli(capsys, "verify", deltas["dare"], "--base", model)
    assert_one_error_line(rc, err, "pickle")
    assert listing(out_root) == []


# ---------------------------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("direction", ["llama-base+bert-ft", "bert-base+llama-ft"])
def test_mismatched_architectures(
    direction: str,
    tiny_llama_dir: Path,
    tiny_bert_classifier_dir: Path,
    out_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if direction == "llama-base+bert-ft":
        base, ft = tiny_llama_dir, tiny_bert_classifier_dir
    else:
        base, ft = tiny_bert_classifier_dir, tiny_llama_dir
    out = out_root / "d.safetensors"
    with pytest.raises(ArchitectureMismatchError, match="not a fine-tune of this base"):
        compress(CompressOptions(base, ft, out, method="dare"))
    rc, _, err = run_cli(capsys, "compress", base, ft, "-o", out, "--method", "dare")
    assert_one_error_line(rc, err, "not a fine-tune of this base")
    assert listing(out_root) == []


def test_same_model_type_but_unrelated_tensors(tiny_llama_dir: Path, tmp_path: Path, out_root: Path) -> None:
    """Same model_type, but only a few tensor names in common: still not a fine-tune of this base."""
    from safetensors.torch import load_file, save_file

    ft = copy_model(tiny_llama_dir, tmp_path / "renamed")
    tensors = load_file(ft / "model.safetensors")
    save_file({f"x{i}.{k}": v for i, (k, v) in enumerate(tensors.items())}, ft / "model.safetensors")
    with pytest.raises(ArchitectureMismatchError):
        compress(CompressOptions(tiny_llama_dir, ft, out_root / "d.safetensors", method="dare"))
    assert listing(out_root) == []


# ---------------------------------------------------------------------------------------------- truncated


def _cut_points(path: Path) -> dict[str, int]:
    n, head = header(path)
    size = path.stat().st_size
    first = next(v for k, v in head.items() if k != "__metadata__")
    start, end = first["data_offsets"]
    return {
        "empty": 0,
        "inside-length-prefix": 4,
        "after-length-prefix": 8,
        "inside-header": 8 + n // 2,
        "end-of-header": 8 + n,
        "inside-first-tensor": 8 + n + (start + end) // 2,
        "middle-of-data": (8 + n + size) // 2,
        "last-byte-missing": size - 1,
    }


CUTS = [
    "empty",
    "inside-length-prefix",
    "after-length-prefix",
    "inside-header",
    "end-of-header",
    "inside-first-tensor",
    "middle-of-data",
    "last-byte-missing",
]


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_delta_is_a_format_error(cut: str, magnitude_copy: Path) -> None:
    at = _cut_points(magnitude_copy)[cut]
    magnitude_copy.write_bytes(magnitude_copy.read_bytes()[:at])
    with pytest.raises(DeltaFormatError):
        read_delta(magnitude_copy)
    with pytest.raises(DeltaFormatError):
        read_manifest(magnitude_copy)


@pytest.mark.parametrize("cut", ["inside-header", "middle-of-data", "last-byte-missing"])
def test_cli_truncated_delta(
    cut: str,
    magnitude_copy: Path,
    tiny_llama_dir: Path,
    out_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    at = _cut_points(magnitude_copy)[cut]
    magnitude_copy.write_bytes(magnitude_copy.read_bytes()[:at])
    for argv in (
        ["verify", magnitude_copy],
        ["inspect", magnitude_copy],
        ["inspect", "--json", magnitude_copy],
    ):
        rc, stdout, err = run_cli(capsys, *argv)
        assert_one_error_line(rc, err, str(magnitude_copy))
        assert stdout == ""
    rc, _, err = run_cli(capsys, "apply", tiny_llama_dir, magnitude_copy, "-o", out_root / "m")
    assert_one_error_line(rc, err, str(magnitude_copy))
    assert listing(out_root) == []


# ---------------------------------------------------------------------------------------------- bit flips


def _tensor_offset(path: Path, suffix: str, where: float) -> int:
    """A byte inside the data of the first tensor whose key ends with `suffix`."""
    n, head = header(path)
    key = sorted(k for k in head if k.endswith(suffix))[0]
    start, end = (int(x) for x in head[key]["data_offsets"])
    return 8 + n + start + int((end - start - 1) * where)


@pytest.mark.parametrize(
    ("method", "suffix", "where"),
    [
        ("dare", "::values", 0.0),
        ("dare", "::values", 0.5),
        ("dare", "::values", 1.0),
        ("magnitude", "::gaps", 0.5),
        ("magnitude", "::values", 0.99),
    ],
)
def test_bit_flip_in_tensor_data(
    method: str,
    suffix: str,
    where: float,
    deltas: dict[str, Path],
    tiny_llama_dir: Path,
    tmp_path: Path,
    out_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    victim = Path(shutil.copy2(deltas[method], tmp_path / "victim.safetensors"))
    flip(victim, _tensor_offset(victim, suffix, where))
    with pytest.raises(DeltaFormatError, match="tensor data is corrupted"):
        read_delta(victim)
    with pytest.raises(DeltaFormatError, match="tensor data is corrupted"):
        apply_to_dir(tiny_llama_dir, victim, out_root / "m")
    rc, _, err = run_cli(capsys, "verify", victim)
    assert_one_error_line(rc, err, "corrupted")
    rc, _, err = run_cli(capsys, "verify", victim, "--base", tiny_llama_dir)
    assert_one_error_line(rc, err, "corrupted")
    rc, _, err = run_cli(capsys, "apply", tiny_llama_dir, victim, "-o", out_root / "m")
    assert_one_error_line(rc, err, "corrupted")
    assert listing(out_root) == []


def _manifest_span(path: Path) -> tuple[int, int]:
    """Byte range of the (escaped) manifest string inside the file's JSON header."""
    n, _ = header(path)
    head = path.read_bytes()[8 : 8 + n]
    key = b'"deltaserve.manifest":"'
    start = head.index(key) + len(key)
    end = head.index(b'}"', start) + 1  # inside the string every quote is escaped: this is its end
    return 8 + start, 8 + end


def test_bit_flip_in_manifest_value_is_caught_by_its_checksum(
    dare_copy: Path, tiny_llama_dir: Path, out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flip that keeps the header valid JSON (the delta's name abcxyz -> abcxyy)."""
    data = dare_copy.read_bytes()
    n, _ = header(dare_copy)
    at = data.index(b"abcxyz", 8, 8 + n) + 5
    flip(dare_copy, at, ord("z") ^ ord("y"))
    assert header(dare_copy)[1]["__metadata__"]["deltaserve.manifest"]  # still a parseable header
    with pytest.raises(DeltaFormatError, match="manifest is corrupted"):
        read_manifest(dare_copy)
    with pytest.raises(DeltaFormatError, match="manifest is corrupted"):
        read_delta(dare_copy)
    for argv in (["verify", dare_copy], ["inspect", dare_copy]):
        rc, _, err = run_cli(capsys, *argv)
        assert_one_error_line(rc, err, "manifest is corrupted")
    rc, _, err = run_cli(capsys, "apply", tiny_llama_dir, dare_copy, "-o", out_root / "m")
    assert_one_error_line(rc, err, "manifest is corrupted")
    assert listing(out_root) == []


@pytest.mark.parametrize("where", [0.02, 0.25, 0.5, 0.75, 0.98])
def test_bit_flip_anywhere_in_manifest(
    where: float, dare_copy: Path, tiny_llama_dir: Path, out_root: Path
) -> None:
    start, end = _manifest_span(dare_copy)
    flip(dare_copy, start + int((end - start) * where))
    with pytest.raises(DeltaFormatError):
        read_manifest(dare_copy)
    with pytest.raises(DeltaFormatError):
        read_delta(dare_copy)
    with pytest.raises(DeltaFormatError):
        apply_to_dir(tiny_llama_dir, dare_copy, out_root / "m")
    assert listing(out_root) == []


def test_bit_flip_in_manifest_checksum(dare_copy: Path) -> None:
    n, head = header(dare_copy)
    digest = head["__metadata__"]["deltaserve.manifest_sha256"]
    assert isinstance(digest, str)
    at = dare_copy.read_bytes().index(digest.encode(), 8, 8 + n) + 10
    flip(dare_copy, at, 0x01 if chr(dare_copy.read_bytes()[at]) not in "01" else 0x02)
    with pytest.raises(DeltaFormatError, match="manifest is corrupted"):
        read_delta(dare_copy)


def test_tampered_tensor_dtype_in_header(dare_copy: Path) -> None:
    """F32 -> I32 keeps every offset valid; the declared dtype no longer matches the manifest."""
    data = dare_copy.read_bytes()
    n, _ = header(dare_copy)
    at = data.index(b'"F32"', 8, 8 + n) + 1
    flip(dare_copy, at, ord("F") ^ ord("I"))
    with pytest.raises(DeltaFormatError, match=r"the manifest says float32"):
        read_delta(dare_copy)


def test_not_a_delta_file(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tiny_llama_dir / "model.safetensors"
    with pytest.raises(DeltaFormatError, match="not a delta"):
        read_delta(weights)
    rc, _, err = run_cli(capsys, "verify", weights)
    assert_one_error_line(rc, err, "not a delta")


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_missing_or_directory_delta(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in (tmp_path / "nothing.safetensors", tmp_path):
        rc, stdout, err = run_cli(capsys, command, path)
        assert_one_error_line(rc, err, str(path))
        assert stdout == ""


def test_extra_tensor_beside_a_valid_manifest(dare_copy: Path) -> None:
    """Keys must match the manifest exactly, even when the manifest itself is intact."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(dare_copy), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    tensors["smuggled::values"] = torch.zeros(3)
    save_file(tensors, str(dare_copy), metadata=meta)
    with pytest.raises(DeltaFormatError, match="do not match the manifest"):
        read_delta(dare_copy)


# ---------------------------------------------------------------------------------------------- wrong base


def test_delta_for_another_base(
    deltas: dict[str, Path],
    other_llama_dir: Path,
    tiny_llama_dir: Path,
    out_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Same names and shapes: only the fingerprint tells the bases apart.
    with ModelDir.open(tiny_llama_dir) as a, ModelDir.open(other_llama_dir) as b:
        assert [(n, a.info(n)) for n in a.names()] == [(n, b.info(n)) for n in b.names()]
    delta = deltas["dare"]
    with pytest.raises(BaseMismatchError, match="made for base"):
        apply_to_dir(other_llama_dir, delta, out_root / "m")
    rc, _, err = run_cli(capsys, "apply", other_llama_dir, delta, "-o", out_root / "m")
    assert_one_error_line(rc, err, "made for base")
    rc, stdout, err = run_cli(capsys, "verify", delta, "--base", other_llama_dir)
    assert_one_error_line(rc, err, "made for base")
    assert not stdout.startswith("ok")
    assert listing(out_root) == []
    # ...while the right base passes.
    rc, stdout, _ = run_cli(capsys, "verify", delta, "--base", tiny_llama_dir)
    assert rc == 0 and stdout.startswith("ok:")


def test_delta_for_another_architecture(
    deltas: dict[str, Path], tiny_bert_dir: Path, out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run_cli(capsys, "verify", deltas["dare"], "--base", tiny_bert_dir)
    assert_one_error_line(rc, err)
    rc, _, err = run_cli(capsys, "apply", tiny_bert_dir, deltas["dare"], "-o", out_root / "m")
    assert_one_error_line(rc, err)
    assert listing(out_root) == []


# ---------------------------------------------------------------------------------------------- indices


@pytest.mark.parametrize(
    ("indices", "encoding", "nnz", "message"),
    [
        ([0, 5, 16], enc.INDICES_I32, None, "out of range"),  # numel is 16
        ([3, 2**31 - 1], enc.INDICES_I32, None, "out of range"),
        ([-1, 4], enc.INDICES_I32, None, "out of range"),
        ([4, 4, 9], enc.INDICES_I32, None, "not strictly increasing"),
        ([9, 4], enc.INDICES_I32, None, "not strictly increasing"),
        ([0, 15, 16], enc.VARINT_GAPS, None, "out of range"),
        ([1, 100000], enc.VARINT_GAPS, None, "out of range"),
        (list(range(17)), enc.INDICES_I32, None, "keeps 17 values of 16"),
        ([0, 1], enc.SEEDED, None, "seeded but has no density"),
        ([0, 1], enc.SEEDED_BLOCKS, None, "seeded in blocks but has no density or block"),
    ],
)
def test_out_of_range_indices_with_valid_checksums(
    indices: list[int], encoding: Encoding, nnz: int | None, message: str, tmp_path: Path
) -> None:
    path = write_delta(
        make_delta("w", (4, 4), indices, encoding=encoding, nnz=nnz), tmp_path / "d.safetensors"
    )
    read_manifest(path)  # the checksums are right: only the bounds checks can catch it
    with pytest.raises(DeltaFormatError, match=message):
        read_delta(path)


def test_seeded_count_mismatch(tmp_path: Path) -> None:
    """A seeded entry whose stored value count is not what its mask regenerates to."""
    delta = make_delta("w", (64, 64), [0, 1, 2], encoding=enc.SEEDED)
    entry = delta.manifest.params["w"].model_copy(update={"density": 0.5})
    manifest = delta.manifest.model_copy(update={"params": {"w": entry}})
    path = write_delta(Delta(manifest, delta.sparse), tmp_path / "d.safetensors")
    with pytest.raises(DeltaFormatError, match="seeded mask keeps"):
        read_delta(path)


def test_seeded_blocks_count_mismatch(tmp_path: Path) -> None:
    """A block-mask entry whose value count is not what its block mask regenerates to."""
    delta = make_delta("w", (64, 64), [0, 1, 2], encoding=enc.SEEDED_BLOCKS)
    entry = delta.manifest.params["w"].model_copy(update={"density": 0.5, "block": 16})
    manifest = delta.manifest.model_copy(update={"params": {"w": entry}})
    path = write_delta(Delta(manifest, delta.sparse), tmp_path / "d.safetensors")
    with pytest.raises(DeltaFormatError, match="seeded block mask keeps"):
        read_delta(path)


@pytest.fixture
def out_of_range_real_delta(deltas: dict[str, Path], tmp_path: Path) -> Path:
    """The real tiny-llama delta with one tensor re-encoded as indices_i32 pointing one past its end."""
    good = read_delta(deltas["dare"])
    name = "model.layers.0.self_attn.q_proj.weight"
    sp = good.sparse[name]
    numel = sp.shape[0] * sp.shape[1]
    bad_indices = sp.indices.clone()
    bad_indices[-1] = numel
    entry = good.manifest.params[name].model_copy(update={"encoding": enc.INDICES_I32, "density": None})
    manifest = good.manifest.model_copy(update={"params": {**good.manifest.params, name: entry}})
    sparse = {**good.sparse, name: SparseParam(sp.shape, bad_indices, sp.values)}
    return write_delta(Delta(manifest, sparse, good.dense), tmp_path / "oob.safetensors")


def test_cli_out_of_range_indices(
    out_of_range_real_delta: Path,
    tiny_llama_dir: Path,
    out_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = out_of_range_real_delta
    with pytest.raises(DeltaFormatError, match="out of range"):
        apply_to_dir(tiny_llama_dir, path, out_root / "m")
    for argv in (["verify", path], ["verify", path, "--base", tiny_llama_dir]):
        rc, _, err = run_cli(capsys, *argv)
        assert_one_error_line(rc, err, "out of range")
    rc, _, err = run_cli(capsys, "apply", tiny_llama_dir, path, "-o", out_root / "m")
    assert_one_error_line(rc, err, "out of range")
    assert listing(out_root) == []


# ---------------------------------------------------------------------------------------------- names


BAD_NAMES = ["a/b", "../evil", "..", ".", "x/../y", "/abs", "back\\slash", "sp ace", ".hidden", "-flag"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name_api(name: str, tiny_llama_dir: Path, ft_dir: Path, out_root: Path) -> None:
    with pytest.raises(InvalidNameError, match="invalid delta name"):
        compress(
            CompressOptions(tiny_llama_dir, ft_dir, out_root / "d.safetensors", method="dare", name=name)
        )
    assert listing(out_root) == []


@pytest.mark.parametrize("name", ["a/b", "../evil", ".."])
def test_bad_name_cli(
    name: str, tiny_llama_dir: Path, ft_dir: Path, out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = out_root / "d.safetensors"
    rc, _, err = run_cli(
        capsys, "compress", tiny_llama_dir, ft_dir, "-o", out, "--method", "dare", "--name", name
    )
    assert_one_error_line(rc, err, "invalid delta name", repr(name))
    assert listing(out_root) == []
    assert not (out_root.parent / "evil").exists()


# ---------------------------------------------------------------------------------------------- options


def test_unknown_method_lists_the_valid_ones(
    tiny_llama_dir: Path, ft_dir: Path, out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deltas_store.compression.registry import METHODS

    out = out_root / "d.safetensors"
    with pytest.raises(UnknownMethodError):
        compress(CompressOptions(tiny_llama_dir, ft_dir, out, method="nope"))
    rc, _, err = run_cli(capsys, "compress", tiny_llama_dir, ft_dir, "-o", out, "--method", "nope")
    line = assert_one_error_line(rc, err, "'nope'")
    for valid in ("dare", "darex-q", "magnitude", *METHODS):
        assert valid in line
    assert listing(out_root) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "dare", "--drop-rate", "1.0"], "drop rate"),
        (["--method", "dare", "--drop-rate", "-0.1"], "drop rate"),
        (["--method", "dare", "--drop-rate", "1.5"], "drop rate"),
        (["--method", "darex-q", "--drop-rate", "0.9", "--q", "0.05"], "q must be in"),
        (["--method", "darex-q", "--drop-rate", "0.5", "--q", "0.49"], "q must be in"),
        (["--method", "darex-q", "--q", "0"], "q must be in"),
        (["--method", "darex-q", "--q", "1.5"], "q must be in"),
        (["--method", "dare", "--seed", "-1"], "seed"),
    ],
)
def test_bad_option_values_fail_before_any_work(
    flags: list[str], message: str, out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model dirs do not even exist: the option check must come first, and say what is wrong."""
    nowhere = out_root.parent / "nowhere"
    rc, _, err = run_cli(capsys, "compress", nowhere, nowhere, "-o", out_root / "d.safetensors", *flags)
    line = assert_one_error_line(rc, err, message)
    assert "no such directory" not in line
    assert listing(out_root) == []


@pytest.mark.parametrize(
    ("env", "value"),
    [("DELTASERVE_DROP_RATE", "1.5"), ("DELTASERVE_DROP_RATE", "lots"), ("DELTASERVE_SEED", "-3")],
)
def test_bad_environment_value_is_one_line(
    env: str, value: str, monkeypatch: pytest.MonkeyPatch, out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(env, value)
    nowhere = out_root.parent / "nowhere"
    rc, _, err = run_cli(capsys, "compress", nowhere, nowhere, "-o", out_root / "d.safetensors")
    assert_one_error_line(rc, err, env.removeprefix("DELTASERVE_").lower())
    assert listing(out_root) == []


# ---------------------------------------------------------------------------------------------- outputs


def test_compress_output_is_a_directory(
    tiny_llama_dir: Path, ft_dir: Path, out_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = out_root / "somedir"
    target.mkdir()
    rc, _, err = run_cli(capsys, "compress", tiny_llama_dir, ft_dir, "-o", target, "--method", "dare")
    assert_one_error_line(rc, err, str(target))
    assert listing(out_root) == ["somedir"]
    assert listing(target) == []


@pytest.mark.parametrize("existing", ["non-empty-dir", "file"])
def test_apply_refuses_an_occupied_output(
    existing: str,
    deltas: dict[str, Path],
    tiny_llama_dir: Path,
    out_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = out_root / "m"
    if existing == "file":
        target.write_text("keep me")
    else:
        target.mkdir()
        (target / "keep.txt").write_text("keep me")
    with pytest.raises(ModelDirError, match="exists"):
        apply_to_dir(tiny_llama_dir, deltas["dare"], target)
    rc, _, err = run_cli(capsys, "apply", tiny_llama_dir, deltas["dare"], "-o", target)
    assert_one_error_line(rc, err, str(target))
    assert listing(out_root) == ["m"]
    kept = target if existing == "file" else target / "keep.txt"
    assert kept.read_text() == "keep me"


def test_failed_compress_keeps_the_previous_file(
    tiny_llama_dir: Path,
    ft_dir: Path,
    tiny_bert_classifier_dir: Path,
    deltas: dict[str, Path],
    out_root: Path,
) -> None:
    out = Path(shutil.copy2(deltas["dare"], out_root / "d.safetensors"))
    before = out.read_bytes()
    with pytest.raises(UnknownMethodError):
        compress(CompressOptions(tiny_llama_dir, ft_dir, out, method="nope"))
    with pytest.raises(ModelDirError):
        compress(CompressOptions(tiny_llama_dir, tiny_llama_dir.parent / "nope", out, method="dare"))
    with pytest.raises(ArchitectureMismatchError):
        compress(CompressOptions(tiny_llama_dir, tiny_bert_classifier_dir, out, method="dare"))
    assert out.read_bytes() == before
    assert listing(out_root) == ["d.safetensors"]


def test_crash_while_writing_a_delta_leaves_nothing(
    deltas: dict[str, Path], out_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deltas_store.format.io as io

    delta = read_delta(deltas["dare"])

    def half_written(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "save_file", half_written)
    with pytest.raises(OSError, match="No space"):
        write_delta(delta, out_root / "d.safetensors")
    assert listing(out_root) == []


def test_crash_while_applying_leaves_nothing(
    deltas: dict[str, Path], tiny_llama_dir: Path, out_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", no_space)  # the copy of the tokenizer files
    with pytest.raises(OSError, match="No space"):
        apply_to_dir(tiny_llama_dir, deltas["dare"], out_root / "m")
    assert listing(out_root) == []


# ---------------------------------------------------------------------------------------------- console script


def test_console_script_error_is_one_line(deltas: dict[str, Path], tmp_path: Path) -> None:
    """The installed `deltaserve` executable: exit 1, one `error:` line, no traceback."""
    victim = Path(shutil.copy2(deltas["magnitude"], tmp_path / "victim.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-10])
    proc = subprocess.run(
        [str(DELTASERVE), "verify", str(victim)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert_one_error_line(proc.returncode, proc.stderr, str(victim))
