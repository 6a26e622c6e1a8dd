"""Read-only access to a Hugging Face model directory: config plus safetensors weights, sharded or not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from deltas_store.errors import ModelDirError, UnsafeCheckpointError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SHARD_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype tag, e.g. "BF16"


class ModelDir:
    """A Hugging Face model directory opened for streaming reads, one tensor at a time.

    Example::

        with ModelDir.open("models/base") as base:
            w = base.get_tensor("model.layers.0.self_attn.q_proj.weight")
    """

    def __init__(self, path: Path, config: dict[str, Any], files: dict[str, Path]) -> None:
        self.path = path
        self.config = config
        self._file_of = files  # tensor name -> shard file
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(cls, path: str | Path) -> ModelDir:
        path = Path(path)
        if not path.exists():
            raise ModelDirError(f"{path}: no such directory")
        if not path.is_dir():
            raise ModelDirError(f"{path}: not a directory (expected a Hugging Face model directory)")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ModelDirError(f"{path}: no config.json (not a Hugging Face model directory)")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelDirError(f"{config_path}: invalid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ModelDirError(f"{config_path}: expected a JSON object")
        return cls(path, config, _tensor_files(path))

    def __enter__(self) -> ModelDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures")
        return str(archs[0]) if isinstance(archs, list) and archs else None

    @property
    def model_id(self) -> str:
        return str(self.config.get("_name_or_path") or self.path.resolve().name)

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def _handle(self, name: str) -> Any:
        try:
            file = self._file_of[name]
        except KeyError:
            raise ModelDirError(f"{self.path}: no tensor named {name!r}") from None
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise ModelDirError(f"{file}: unreadable safetensors file ({exc})") from None
        return self._handles[file]

    def info(self, name: str) -> TensorInfo:
        sl = self._handle(name).get_slice(name)
        return TensorInfo(tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))

    def get_tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)  # type: ignore[no-any-return]
        except SafetensorError as exc:
            raise ModelDirError(f"{self.path}: cannot read tensor {name!r} ({exc})") from None

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop along the first dimension, reading only those bytes."""
        try:
            return self._handle(name).get_slice(name)[start:stop]  # type: ignore[no-any-return]
        except SafetensorError as exc:
            raise ModelDirError(f"{self.path}: cannot read tensor {name!r} ({exc})") from None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get_tensor(name)

    def safetensors_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._file_of.values()))


def _tensor_files(path: Path) -> dict[str, Path]:
    index = path / SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelDirError(f"{index}: invalid shard index ({exc})") from None
        files: dict[str, Path] = {}
        for name, shard in weight_map.items():
            shard_path = (path / shard).resolve()
            if shard_path.parent != path.resolve() or not shard_path.is_file():
                raise ModelDirError(f"{index}: shard {shard!r} is missing or outside the model directory")
            files[name] = shard_path
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise UnsafeCheckpointError(
                f"{path}: holds only pickle checkpoints ({', '.join(sorted(pickles))}); deltaserve loads "
                "safetensors only. Convert with `model.save_pretrained(dir, safe_serialization=True)`."
            )
        raise ModelDirError(f"{path}: no *.safetensors weights found")
    files = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118
                    files[name] = shard
        except (SafetensorError, OSError) as exc:
            raise ModelDirError(f"{shard}: unreadable safetensors file ({exc})") from None
    return files


def tokenizer_files(path: Path) -> list[Path]:
    """Files a tokenizer needs, to copy beside applied weights."""
    names = (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "added_tokens.json",
        "generation_config.json",
        "chat_template.jinja",
        "chat_template.json",
    )
    return [path / n for n in names if (path / n).is_file()]
