"""The versioned JSON manifest stored in a delta file's safetensors metadata."""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from deltas_store.errors import DeltaFormatError

FORMAT_NAME: Final = "deltaserve.delta"
FORMAT_VERSION = 1
MANIFEST_KEY = "deltaserve.manifest"
MANIFEST_DIGEST_KEY = "deltaserve.manifest_sha256"

Encoding = Literal["seeded", "seeded_blocks", "varint_gaps", "indices_i32", "columns", "rows", "dense"]


def _omit_none(data: dict[str, Any], key: str) -> dict[str, Any]:
    """Leave an optional field out of the JSON while unset, so files without it keep their exact bytes."""
    if data.get(key, 0) is None:
        del data[key]
    return data


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ParamEntry(_Frozen):
    """One parameter of the fine-tune that the delta changes."""

    kind: Literal["sparse", "dense"]
    shape: tuple[int, ...]
    dtype: str  # the parameter's dtype in the fine-tune, e.g. "bfloat16"
    nnz: int = Field(ge=0)  # kept values (sparse) or numel (dense)
    encoding: Encoding
    density: float | None = None  # the mask density (seeded encoding regenerates the mask from it)
    # seeded_blocks: values kept in aligned runs of this length; left out of the JSON otherwise, so files
    # without block masks are byte-for-byte what earlier versions wrote
    block: int | None = Field(None, ge=2)
    scale: float | None = None  # what every kept delta was multiplied by (1/q, 1/(1-p), or 1)
    base_name: str | None = None  # the base checkpoint's name when it differs (prefix alignment)

    @model_serializer(mode="wrap")
    def _omit_unset_block(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit_none(handler(self), "block")


class BaseInfo(_Frozen):
    """Which base the delta belongs to; the fingerprint catches a different base of the same shapes."""

    id: str
    architecture: str | None
    fingerprint: str
    num_tensors: int
    num_params: int


class Calibration(_Frozen):
    """What the q search measured: the winning score and every grid point it tried."""

    metric: str
    score: float | None
    source: str
    grid: tuple[tuple[float, float], ...] = ()
    details: dict[str, Any] = Field(default_factory=dict)


class AutoSelection(_Frozen):
    """What `--method auto` measured and why it chose the method the delta was made with."""

    method: str
    q_mode: str
    reason: str
    measured: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Frozen):
    format: Literal["deltaserve.delta"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    name: str
    created: str
    deltaserve_version: str
    base: BaseInfo
    finetune_id: str
    finetune_architecture: str | None
    finetune_config: dict[str, Any] = Field(default_factory=dict)  # config.json of the fine-tune
    method: str
    drop_rate: float = Field(ge=0.0, lt=1.0)
    q: float | None = None  # global q (darex-q); None when per tensor or not applicable
    seed: int = Field(ge=0)
    value_dtype: str
    prune_scope: str
    base_prefix: str = ""  # base names are finetune names minus finetune_prefix plus base_prefix
    finetune_prefix: str = ""
    params: dict[str, ParamEntry]
    unchanged: tuple[str, ...] = ()  # fine-tune parameters equal to the base (stored nowhere)
    calibration: Calibration | None = None
    # Set when `--method auto` chose the method; left out of the JSON otherwise, so files made without it are
    # byte-for-byte what earlier versions wrote.
    auto: AutoSelection | None = None
    data_sha256: str

    @model_serializer(mode="wrap")
    def _omit_unset_auto(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit_none(handler(self), "auto")

    @property
    def density(self) -> float:
        return 1.0 - self.drop_rate

    def base_name(self, finetune_name: str) -> str:
        entry = self.params.get(finetune_name)
        if entry is not None and entry.base_name is not None:
            return entry.base_name
        return to_base_name(finetune_name, self.finetune_prefix, self.base_prefix)


def to_base_name(finetune_name: str, finetune_prefix: str, base_prefix: str) -> str:
    if finetune_prefix and finetune_name.startswith(finetune_prefix):
        finetune_name = finetune_name[len(finetune_prefix) :]
    return base_prefix + finetune_name


def parse_manifest(raw: str) -> Manifest:
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DeltaFormatError(f"invalid delta manifest ({where}: {first['msg']})") from None
    if manifest.format_version > FORMAT_VERSION:
        raise DeltaFormatError(
            f"delta format version {manifest.format_version} is newer than this deltaserve "
            f"understands ({FORMAT_VERSION}); upgrade deltaserve"
        )
    return manifest
