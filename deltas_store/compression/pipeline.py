"""`deltaserve compress`: base + fine-tune (or a PEFT LoRA adapter) -> a pruned, rescaled sparse delta file."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from deltas_store.checkpoint import ModelDir
from deltas_store.compression.qtuning import Rescaling
from deltas_store.compression.registry import AUTO, PruningMethod, get_method
from deltas_store.compression.session import CalibrationSession, measure_and_choose, search_rescaling
from deltas_store.compression.streaming import StreamedDeltas, stream_deltas
from deltas_store.extraction import PRUNE_SCOPES, Alignment, align_names, check_compatible
from deltas_store.fingerprint import base_fingerprint
from deltas_store.format.io import Delta, SparseParam, dtype_name, read_manifest, write_delta
from deltas_store.format.manifest import BaseInfo, Calibration, Manifest, ParamEntry
from deltas_store.lora import open_finetune
from deltas_store.store import validate_name
from deltas_store.version import __version__

Q_MODES = ("global", "per-layer", "per-layer-abs", "best")


@dataclass(frozen=True)
class CompressOptions:
    """Everything `compress` needs; the CLI fills it from flags and DELTASERVE_* variables.

    q search (methods that rescale by 1/q, when `q` is not given): `q_mode` "global" searches one q,
    "per-layer" Algorithm 3's per-layer q with η searched (or fixed by `eta`; "per-layer-abs" the same with
    |Σc| per row, a measured variant), "best" global and per-layer, keeping the
    better. Scores average over `mask_seeds` masks (seed, seed + 1, ...; paper: 4, outlier dropped).
    Label-free by default; labeled with `metric` (model -> score, higher is better) or a `validation` JSONL.
    """

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
    q_mode: str = "global"
    mask_seeds: int = 1
    eta: float | None = None
    validation: Path | None = None
    mask_block: int = 1  # random masks: keep aligned runs of this many entries whole (16 fp32 = 64 bytes)
    metric: Callable[[torch.nn.Module], float] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class CompressResult:
    path: Path
    manifest: Manifest
    file_bytes: int
    finetuned_bytes: int
    log: list[str] = field(default_factory=list)


def compress(options: CompressOptions) -> CompressResult:
    """Extract, prune, rescale (searching q when needed) and write a delta file atomically.

    Example::

        compress(CompressOptions(Path("base"), Path("math-ft"), Path("math.safetensors"), drop_rate=0.99))
    """
    if options.method != AUTO:
        get_method(options.method)  # unknown names fail before any work
    _validate(options)
    name = validate_name(options.name or options.out.stem.removesuffix(".delta"))
    with ModelDir.open(options.base) as base, open_finetune(options.finetuned, base) as ft:
        alignment = align_names(base, ft)
        check_compatible(base, ft, alignment)
        session, auto = None, None
        if options.method == AUTO:
            session = _open_session(options, base, ft)
            auto = measure_and_choose(
                session,
                base,
                ft,
                alignment,
                drop_rate=options.drop_rate,
                seed=options.seed,
                keep_dense=tuple(re.compile(p) for p in options.keep_dense),
                prune_scope=options.prune_scope,
                has_calibration=options.calibration is not None,
                labeled=options.metric is not None or options.validation is not None,
                quiet=options.quiet,
            )
            q_mode = auto.q_mode if auto.q_mode in Q_MODES else options.q_mode
            options = replace(options, method=auto.method, q_mode=q_mode)
        method = get_method(options.method)
        if options.mask_block > 1 and method.selection == "random":  # auto may have chosen another kind
            method = method.with_block(options.mask_block)
        density = 1.0 - options.drop_rate
        search = method.rescale == "q" and options.q is None
        per_layer = search and options.q_mode != "global"
        if session is None and (search or method.needs_activations):
            session = _open_session(options, base, ft)
        objective = None
        if search and session is not None:  # built before the long pass, so a bad validation file fails early
            objective = session.labeled(options.metric, options.validation) or session.label_free()
        seeds = [options.seed + i for i in range(options.mask_seeds if search and method.random else 1)]
        streamed = stream_deltas(
            base,
            ft,
            alignment,
            method,
            density,
            seeds,
            keep_dense=tuple(re.compile(p) for p in options.keep_dense),
            prune_scope=options.prune_scope,
            inputs=session.inputs if session is not None else None,
            row_sums=per_layer,
            quiet=options.quiet,
        )
        calibration = None
        if objective is not None and session is not None:
            rescaling = search_rescaling(
                session,
                base,
                streamed,
                objective,
                options.drop_rate,
                options.q_mode,
                options.eta,
                options.quiet,
            )
            calibration = Calibration(
                metric=objective.metric,
                score=rescaling.score,
                source=objective.source,
                grid=rescaling.grid,
                details=rescaling.details,
            )
        else:
            scale = method.scale(density, options.q)
            q = options.q if method.rescale == "q" else None  # a --q a method ignores is not recorded
            rescaling = Rescaling(q, dict.fromkeys(streamed.params, scale), 0.0, ())
        manifest = _manifest(options, method, name, base, ft, alignment, streamed, rescaling)
        manifest = manifest.model_copy(update={"calibration": calibration, "auto": auto})
        kept = streamed.masks[0]
        sparse = {
            n: SparseParam(p.shape, kept[n].indices, (kept[n].delta * rescaling.scales[n]).to(p.dtype))
            for n, p in streamed.params.items()
        }
        path = write_delta(Delta(manifest, sparse, streamed.dense), options.out)
        ft_bytes = ft.safetensors_bytes()
    return CompressResult(path, read_manifest(path), path.stat().st_size, ft_bytes)


def _validate(options: CompressOptions) -> None:
    if not 0.0 <= options.drop_rate < 1.0:
        raise ValueError(f"drop rate must be in [0, 1), got {options.drop_rate}")
    if options.prune_scope not in PRUNE_SCOPES:
        raise ValueError(f"prune scope must be one of {', '.join(PRUNE_SCOPES)}")
    if options.seed < 0:
        raise ValueError("seed must be non-negative")
    if options.mask_seeds < 1:
        raise ValueError(f"mask seeds must be at least 1, got {options.mask_seeds}")
    if options.q_mode not in Q_MODES:
        raise ValueError(f"q mode must be one of {', '.join(Q_MODES)}, got {options.q_mode!r}")
    if options.eta is not None and options.eta <= 0:
        raise ValueError(f"eta must be positive, got {options.eta}")
    if options.out.is_dir():
        raise ValueError(f"{options.out}: is a directory; -o takes the delta file's path")
    if options.mask_block < 1:
        raise ValueError(f"mask block must be at least 1, got {options.mask_block}")
    if options.method == AUTO:
        return
    method = get_method(options.method).with_block(options.mask_block)
    if options.q is not None:
        method.scale(1.0 - options.drop_rate, options.q)  # validates the range before any work
    if options.q_mode != "global" and (method.rescale != "q" or options.q is not None):
        raise ValueError(
            f"q mode {options.q_mode!r} searches q: it needs a 1/q method (darex-q, structural) and no --q"
        )
    if (options.validation is not None or options.metric is not None) and (
        method.rescale != "q" or options.q is not None
    ):
        raise ValueError("a validation set or metric drives the q search: it needs a 1/q method and no --q")
    if options.q_mode != "global" and method.selection == "rows":
        raise ValueError("per-layer q (Algorithm 3) assumes element- or column-wise masks, not whole rows")
    if options.q_mode != "global" and options.drop_rate == 0.0:
        raise ValueError("per-layer q needs a drop rate above 0")


def _open_session(options: CompressOptions, base: ModelDir, ft: ModelDir) -> CalibrationSession:
    return CalibrationSession.open(
        base, ft, options.calibration, options.calibration_samples, options.calibration_tokens
    )


def _manifest(
    options: CompressOptions,
    method: PruningMethod,
    name: str,
    base: ModelDir,
    ft: ModelDir,
    alignment: Alignment,
    streamed: StreamedDeltas,
    rescaling: Rescaling,
) -> Manifest:
    density = 1.0 - options.drop_rate
    params: dict[str, ParamEntry] = {}
    value_dtypes = set()
    for n, p in streamed.params.items():
        kept = streamed.masks[0][n]
        value_dtypes.add(dtype_name(p.dtype))
        params[n] = ParamEntry(
            kind="sparse",
            shape=p.shape,
            dtype=dtype_name(p.dtype),
            nnz=int(kept.indices.numel()),
            encoding=method.encoding,
            density=density if method.seeded else None,
            block=method.block if method.block > 1 else None,
            scale=rescaling.scales[n],
            base_name=p.base_name if p.base_name != n else None,
        )
    for n, d in streamed.dense.items():
        shape = tuple(d.value.shape)
        params[n] = ParamEntry(
            kind="dense", shape=shape, dtype=dtype_name(d.value.dtype), nnz=d.value.numel(), encoding="dense"
        )
    return Manifest(
        name=name,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        deltaserve_version=__version__,
        base=BaseInfo(
            id=base.model_id,
            architecture=base.architecture,
            fingerprint=base_fingerprint(base),
            num_tensors=len(base.names()),
            num_params=sum(torch.Size(base.info(n).shape).numel() for n in base.names()),
        ),
        finetune_id=ft.model_id,
        finetune_architecture=ft.architecture,
        finetune_config=ft.config,
        method=method.name,
        drop_rate=options.drop_rate,
        q=rescaling.q,
        seed=options.seed,
        value_dtype=value_dtypes.pop() if len(value_dtypes) == 1 else "mixed",
        prune_scope=options.prune_scope,
        finetune_prefix=alignment.finetune_prefix,
        base_prefix=alignment.base_prefix,
        params=params,
        unchanged=tuple(streamed.unchanged),
        data_sha256="",
    )
