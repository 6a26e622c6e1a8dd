"""The offline subcommands of `deltaserve`: compress, apply, inspect, verify.

Each is a plug-in object (help, add_arguments, run) loaded lazily by the CLI; torch is imported only
inside `run`, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltas_store.errors import DeltaStoreError


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Typed errors become one clear line on stderr and exit code 1; never a traceback for bad input."""

    def wrapper(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        try:
            return run(args)
        except DeltaStoreError as exc:
            return _fail(str(exc))
        except ValidationError as exc:  # a DELTASERVE_* variable that does not parse (a ValueError too)
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            print(f"error: invalid setting: {problems}", file=sys.stderr)
            return 2
        except ValueError as exc:  # option values out of range, raised before any work
            return _fail(str(exc))
        except FileNotFoundError as exc:
            return _fail(f"{exc.filename}: no such file or directory")
        except OSError as exc:  # the output path is a directory, permission denied, disk full, ...
            where = f"{exc.filename}: " if exc.filename else ""
            return _fail(f"{where}{exc.strerror or exc}")

    return wrapper


@dataclass(frozen=True)
class _Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", type=Path, help="base model directory (Hugging Face, safetensors)")
    p.add_argument(
        "finetuned", type=Path, help="fine-tuned model directory, or a PEFT LoRA adapter directory"
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="output delta file (.safetensors)")
    p.add_argument(
        "--method",
        help="dare | darex-q | magnitude | wanda | structural | structural-rows | auto "
        "(default darex-q; DELTASERVE_METHOD)",
    )
    p.add_argument("--drop-rate", type=float, help="fraction of delta entries removed, p (default 0.9)")
    p.add_argument(
        "--q", type=float, help="DAREx-q rescale: kept deltas are multiplied by 1/q (else searched)"
    )
    p.add_argument(
        "--calibration", type=Path, help="text file, one text per line, for the q search and WANDA"
    )
    p.add_argument(
        "--validation",
        type=Path,
        help='JSONL for a labeled q search: {"text", "label"} lines (accuracy) or {"prompt", "answer"} '
        "lines (exact match)",
    )
    p.add_argument(
        "--q-mode",
        choices=["global", "per-layer", "per-layer-abs", "best"],
        help="searched q: one global q, per-layer analytic q (Algorithm 3, eta searched; per-layer-abs: with "
        "|sum c| per row), or the better of global and per-layer",
    )
    p.add_argument("--eta", type=float, help="per-layer q: use this eta instead of searching it")
    p.add_argument(
        "--mask-seeds",
        type=int,
        help="masks the q search averages over (default 1; paper: 4, outlier dropped)",
    )
    p.add_argument(
        "--mask-block",
        type=int,
        help="dare/darex-q: keep aligned runs of N entries whole (16 = one 64-byte line of fp32; faster "
        "hot-swap, measure quality first); default 1, entry by entry",
    )
    p.add_argument("--seed", type=int, help="mask seed (recorded in the manifest)")
    p.add_argument("--name", help="delta name (default: the output file's stem)")
    p.add_argument(
        "--keep-dense", action="append", default=[], metavar="REGEX", help="keep matching parameters dense"
    )
    p.add_argument("--prune-scope", choices=["all", "attn-mlp"], help="which parameters are pruned")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@_guarded
def _compress_run(args: argparse.Namespace) -> int:
    from deltas_store.compression.pipeline import CompressOptions, compress
    from deltas_store.settings import CompressSettings

    s = CompressSettings()

    def pick(flag: object, default: object) -> object:
        return default if flag is None else flag

    options = CompressOptions(
        base=args.base,
        finetuned=args.finetuned,
        out=args.out,
        method=str(pick(args.method, s.method)),
        drop_rate=float(pick(args.drop_rate, s.drop_rate)),  # type: ignore[arg-type]
        q=args.q if args.q is not None else s.q,
        calibration=args.calibration or s.calibration,
        seed=int(pick(args.seed, s.seed)),  # type: ignore[call-overload]
        name=args.name,
        keep_dense=tuple(args.keep_dense),
        prune_scope=str(pick(args.prune_scope, s.prune_scope)),
        calibration_samples=s.calibration_samples,
        calibration_tokens=s.calibration_tokens,
        quiet=args.quiet or s.quiet,
        q_mode=str(pick(args.q_mode, s.q_mode)),
        mask_seeds=int(pick(args.mask_seeds, s.mask_seeds)),  # type: ignore[call-overload]
        eta=args.eta if args.eta is not None else s.eta,
        validation=args.validation or s.validation,
        mask_block=int(pick(args.mask_block, s.mask_block)),  # type: ignore[call-overload]
    )
    result = compress(options)
    m = result.manifest
    q = f" q={m.q:g}" if m.q is not None else (" q per layer" if m.calibration else "")
    print(
        f"wrote {result.path} ({result.file_bytes:,} bytes, {result.file_bytes / result.finetuned_bytes:.2%} "
        f"of the fine-tune): {m.method} p={m.drop_rate:g}{q}, {len(m.params)} tensors"
    )
    if m.auto is not None:
        print(f"auto: {m.auto.reason}")
    if m.calibration is not None and m.calibration.score is not None:
        print(
            f"calibration: {m.calibration.metric} = {m.calibration.score:.6g} ({len(m.calibration.grid)} grid points)"
        )
    return 0


def _apply_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", type=Path, help="base model directory")
    p.add_argument("delta", type=Path, help="delta file")
    p.add_argument("-o", "--out", type=Path, required=True, help="output model directory (must not exist)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@_guarded
def _apply_run(args: argparse.Namespace) -> int:
    from deltas_store.apply import apply_to_dir
    from deltas_store.settings import OutputSettings

    out = apply_to_dir(args.base, args.delta, args.out, quiet=args.quiet or OutputSettings().quiet)
    print(f"wrote {out}")
    return 0


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", type=Path, help="delta file")
    p.add_argument("--json", action="store_true", help="print the summary and full manifest as JSON")


@_guarded
def _inspect_run(args: argparse.Namespace) -> int:
    from deltas_store.format.io import manifest_summary, read_manifest

    manifest = read_manifest(args.delta)
    summary = manifest_summary(manifest, args.delta.stat().st_size)
    if args.json:
        print(json.dumps({"summary": summary, "manifest": manifest.model_dump(mode="json")}, indent=2))
        return 0
    for key, value in summary.items():
        if value is not None or key != "q_per_tensor":
            print(f"{key:>22}: {value}")
    print(f"{'base fingerprint':>22}: {manifest.base.fingerprint}")
    print(f"{'tensors':>22}:")
    for name, e in sorted(manifest.params.items()):
        numel = 1
        for d in e.shape:
            numel *= d
        q = f" q={1.0 / e.scale:.4g}" if e.scale and manifest.q is None and e.scale != 1.0 else ""
        print(
            f"    {name:<60} {e.kind:<6} {e.encoding:<12} {e.nnz:>10,}/{numel:<10,} {e.nnz / numel:7.2%}{q}"
        )
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", type=Path, help="delta file")
    p.add_argument("--base", type=Path, help="also check it fits this base model directory")


@_guarded
def _verify_run(args: argparse.Namespace) -> int:
    from deltas_store.checkpoint import ModelDir
    from deltas_store.fingerprint import base_fingerprint
    from deltas_store.format.io import read_delta
    from deltas_store.patching import check_base
    from deltas_store.verify import check_shapes

    delta = read_delta(args.delta)  # checksums, keys, shapes, dtypes, index bounds
    if args.base is not None:
        with ModelDir.open(args.base) as base:
            check_base(delta.manifest, base_fingerprint(base))
            check_shapes(delta, base)
    where = f" and fits base {args.base}" if args.base else ""
    print(
        f"ok: {args.delta} is intact{where} ({delta.manifest.method}, {len(delta.manifest.params)} tensors)"
    )
    return 0


compress_command = _Command("compress a fine-tune into a sparse delta", _compress_args, _compress_run)
apply_command = _Command("write base + delta as a Hugging Face model directory", _apply_args, _apply_run)
inspect_command = _Command("show a delta's manifest, sizes and densities", _inspect_args, _inspect_run)
verify_command = _Command("check a delta's integrity (and fit to a base)", _verify_args, _verify_run)
