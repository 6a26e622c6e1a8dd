"""`deltaserve compress`: base + fine-tune -> a pruned, rescaled sparse delta file."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltas_store import calibration as cal
from deltas_store.checkpoint import ModelDir
from deltas_store.compression.qsearch import QSearchResult, search_q
from deltas_store.compression.registry import PruningMethod, get_method
from deltas_store.extraction import PRUNE_SCOPES, align_names, check_compatible, iter_param_deltas
from deltas_store.fingerprint import base_fingerprint
from deltas_store.format import encoding as enc
from deltas_store.format.io import Delta, DenseParam, SparseParam, dtype_name, write_delta
from deltas_store.format.manifest import BaseInfo, Calibration, Manifest, ParamEntry
from deltas_store.progress import progress
from deltas_store.store import validate_name
from deltas_store.version import __version__


@dataclass(frozen=True)
class CompressOptions:
    """Everything `compress` needs; the CLI fills it from flags and DELTASERVE_* variables."""

    base: Path
    finetuned: Path
    out: Path
    method: str = "darex-q"
    drop_rate: float = 0.9
    q: float | None = None
    calibration: Path | None = None
    seed: int = 0
    name: str | None = None
    keep_dense: tuple[str, ...] = ()
    prune_scope: str = "all"
    calibration_samples: int = 8
    calibration_tokens: int = 128
    quiet: bool = True


@dataclass(frozen=True)
class CompressResult:
    path: Path
    manifest: Manifest
    file_bytes: int
    finetuned_bytes: int
    log: list[str] = field(default_factory=list)


@dataclass
class _Kept:
    """Kept entries of one parameter before rescaling: float32 deltas at sorted flat indices."""

    base_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    indices: torch.Tensor
    delta: torch.Tensor


def compress(options: CompressOptions) -> CompressResult:
    """Extract, prune, rescale (searching q when needed) and write a delta file atomically."""
    method = get_method(options.method)
    if not 0.0 <= options.drop_rate < 1.0:
        raise ValueError(f"drop rate must be in [0, 1), got {options.drop_rate}")
    if options.prune_scope not in PRUNE_SCOPES:
        raise ValueError(f"prune scope must be one of {', '.join(PRUNE_SCOPES)}")
    if options.seed < 0:
        raise ValueError("seed must be non-negative")
    if options.out.is_dir():
        raise ValueError(f"{options.out}: is a directory; -o takes the delta file's path")
    density = 1.0 - options.drop_rate
    if options.q is not None:
        method.scale(density, options.q)  # validates the range before any work
    name = validate_name(options.name or options.out.stem.removesuffix(".delta"))
    keep_dense = tuple(re.compile(p) for p in options.keep_dense)
    with ModelDir.open(options.base) as base, ModelDir.open(options.finetuned) as ft:
        alignment = align_names(base, ft)
        check_compatible(base, ft, alignment)
        fingerprint = base_fingerprint(base)
        kept: dict[str, _Kept] = {}
        dense: dict[str, DenseParam] = {}
        unchanged: list[str] = []
        names = ft.names()
        for pd in progress(
            iter_param_deltas(base, ft, alignment, keep_dense=keep_dense, prune_scope=options.prune_scope),
            total=len(names),
            desc="diffing",
            quiet=options.quiet,
        ):
            if pd.kind == "unchanged":
                unchanged.append(pd.name)
            elif pd.kind == "dense":
                assert pd.value is not None  # set for every dense ParamDelta
                dense[pd.name] = DenseParam(pd.value)
            else:
                assert pd.delta is not None  # set for every "delta" ParamDelta
                flat = pd.delta.reshape(-1)
                idx = method.keep_indices(pd.delta, density, options.seed, pd.name)
                kept[pd.name] = _Kept(pd.base_name, pd.dtype, pd.shape, idx, flat[idx].clone())
        q, calibration = options.q, None
        if method.rescale == "q" and q is None:
            result, metric, source = _search_q(options, base, kept, density)
            q = result.q
            calibration = Calibration(metric=metric, score=result.score, source=source, grid=result.grid)
        scale = method.scale(density, q)
        manifest = _manifest(
            options, method, name, base, ft, fingerprint, alignment, kept, dense, unchanged, q
        )
        manifest = manifest.model_copy(update={"calibration": calibration})
        sparse = {n: SparseParam(k.shape, k.indices, (k.delta * scale).to(k.dtype)) for n, k in kept.items()}
        delta = Delta(manifest, sparse, dense)
        path = write_delta(delta, options.out)
        ft_bytes = ft.safetensors_bytes()
    from deltas_store.format.io import read_manifest

    return CompressResult(path, read_manifest(path), path.stat().st_size, ft_bytes)


def _manifest(
    options: CompressOptions,
    method: PruningMethod,
    name: str,
    base: ModelDir,
    ft: ModelDir,
    fingerprint: str,
    alignment: object,
    kept: dict[str, _Kept],
    dense: dict[str, DenseParam],
    unchanged: list[str],
    q: float | None,
) -> Manifest:
    density = 1.0 - options.drop_rate
    scale = method.scale(density, q)
    encoding = enc.SEEDED if method.seeded else enc.VARINT_GAPS
    params: dict[str, ParamEntry] = {}
    value_dtypes = set()
    for n, k in kept.items():
        value_dtypes.add(dtype_name(k.dtype))
        params[n] = ParamEntry(
            kind="sparse",
            shape=k.shape,
            dtype=dtype_name(k.dtype),
            nnz=int(k.indices.numel()),
            encoding=encoding,
            density=density if method.seeded else None,
            scale=scale,
            base_name=k.base_name if k.base_name != n else None,
        )
    for n, d in dense.items():
        params[n] = ParamEntry(
            kind="dense",
            shape=tuple(d.value.shape),
            dtype=dtype_name(d.value.dtype),
            nnz=d.value.numel(),
            encoding="dense",
        )
    num_params = sum(_numel(base.info(n).shape) for n in base.names())
    return Manifest(
        name=name,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        deltaserve_version=__version__,
        base=BaseInfo(
            id=base.model_id,
            architecture=base.architecture,
            fingerprint=fingerprint,
            num_tensors=len(base.names()),
            num_params=num_params,
        ),
        finetune_id=ft.model_id,
        finetune_architecture=ft.architecture,
        finetune_config=ft.config,
        method=method.name,
        drop_rate=options.drop_rate,
        q=q,
        seed=options.seed,
        value_dtype=value_dtypes.pop() if len(value_dtypes) == 1 else "mixed",
        prune_scope=options.prune_scope,
        finetune_prefix=getattr(alignment, "finetune_prefix", ""),
        base_prefix=getattr(alignment, "base_prefix", ""),
        params=params,
        unchanged=tuple(unchanged),
        data_sha256="",
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _search_q(
    options: CompressOptions, base: ModelDir, kept: dict[str, _Kept], density: float
) -> tuple[QSearchResult, str, str]:
    """Label-free global q: minimise the last-layer output change against the fine-tune."""
    texts, source = cal.load_texts(options.calibration)
    texts = texts[: options.calibration_samples]
    model = cal.load_model_fp32(options.finetuned, ModelDir.open(options.finetuned).config)
    decoder = cal.is_decoder(ModelDir.open(options.finetuned).config)
    batch = cal.tokenize(options.finetuned, options.base, texts, options.calibration_tokens)
    reference = cal.OutputChange.capture(model, batch, decoder)
    cal.load_base_into_(model, base, {n: k.base_name for n, k in kept.items()})
    weights = dict(model.named_parameters())
    bar = progress(None, total=None, desc="searching q", quiet=options.quiet)

    def score(q: float) -> float:
        originals: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for n, k in kept.items():
                flat = weights[n].view(-1)
                orig = flat.index_select(0, k.indices)
                originals.append((flat, k.indices, orig))
                flat.index_copy_(0, k.indices, orig + k.delta / q)
        try:
            return reference.score(model)
        finally:
            with torch.no_grad():
                for flat, idx, orig in originals:
                    flat.index_copy_(0, idx, orig)
            bar.update(1)

    try:
        result = search_q(score, density)
    finally:
        bar.close()
    return result, reference.metric, source


ScoreFn = Callable[[float], float]
