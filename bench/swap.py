"""Hot-swap benchmark: apply + restore of one delta vs the bytes it must touch and vs copying a full weight set.

Weights are SmolLM2-135M-shaped (names and shapes read from the embedded model's header; random values),
packed into one flat buffer exactly as the server packs them. Deltas are seeded DARE masks at drop rate p
with random values: element masks (`--mask-block 1`, the default) and block masks (`--mask-block 16`: kept
entries in aligned runs of 16, one 64-byte line of fp32). For each base dtype, p and mask, in one run and
interleaved:

  * apply and restore through the server's own swap path (`SwapManager` + `serve_delta`);
  * the bytes-touched lower bound: kept values (originals when restoring) + index data (one int32 per run of
    consecutive kept positions: per value for element masks, per block for block masks) + every touched
    64-byte weight line read and written, in both apply and restore, at the bandwidth of a large tensor
    copy measured in the same run;
  * the access floor: one value read from each touched line, from the same cold start (then warm, as a
    restore follows an apply), which the bandwidth bound cannot see when a few scattered lines leave the
    memory system waiting on latency (p = 0.999);
  * the same swap path over the weights on ordinary 4 KiB pages (the server's host buffers use transparent
    huge pages, `server.engine.packing.host_zeros`);
  * the realistic alternative: copying a whole fine-tuned weight set into the resident tensors from host
    memory (on a GPU also from pinned host memory).

Then a kernel comparison (bit-exactness checked for each): per-tensor deltas_store functions (the old server
path), per-call conversions, the flat layout with gather + add + scatter on every swap, index_add_, and the
server's layout (originals and patched values computed once at load, so a swap is one write) with each
kernel of `server.routing.flat.WRITE_KERNELS` (int64 indices, the server's) and scatter with int32 ones.

    python bench/swap.py --quick --threads 1     # 6 layers of Linear weights, under a minute
    python bench/swap.py                         # the whole model, embedding included
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_io import write_results  # noqa: E402
from deltas_store import PreparedDelta, apply_delta_, restore_  # noqa: E402
from deltas_store.compression.sparsify import seeded_keep_blocks  # noqa: E402
from deltas_store.patching import PatchOp  # noqa: E402
from server.engine.packing import FlatWeights, flat_layout, host_clone, host_zeros  # noqa: E402
from server.metrics import ServerMetrics  # noqa: E402
from server.routing.flat import DEFAULT_KERNEL, WRITE_KERNELS, Runs, gather_bits  # noqa: E402
from server.routing.patching import SwapManager  # noqa: E402
from server.routing.served import serve_delta  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LINE = 64  # bytes per cache line


def smollm2_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of SmolLM2-135M (from the embedded checkpoint's header when present)."""
    try:
        from deltas_store import embedded_base_dir

        with (Path(embedded_base_dir()) / "model.safetensors").open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        header.pop("__metadata__", None)
        return {name: tuple(entry["shape"]) for name, entry in header.items()}
    except (OSError, ValueError, ImportError):
        h, f, kv, layers = 576, 1536, 192, 30
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (49152, h),
            "model.norm.weight": (h,),
        }
        for i in range(layers):
            p = f"model.layers.{i}."
            shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)}  # fmt: skip
        return shapes


def select(shapes: dict[str, tuple[int, ...]], layers: int | None) -> dict[str, tuple[int, ...]]:
    """Everything (layers=None), or the Linear weights of the first `layers` layers."""
    if layers is None:
        return shapes
    keep = {f"model.layers.{i}." for i in range(layers)}
    return {n: s for n, s in shapes.items() if len(s) == 2 and any(n.startswith(k) for k in keep)}


def flat_weights(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> FlatWeights:
    """Random weights laid out exactly as `server.engine.packing.pack_parameters_` lays out a model."""
    sizes = {n: torch.Size(s) for n, s in shapes.items()}
    offsets, total = flat_layout(sizes, dtype)
    values = torch.randn(total, generator=torch.Generator().manual_seed(0)).to(dtype)
    buffer = host_clone(values) if device.type == "cpu" else values.to(device)
    return FlatWeights(buffer, offsets, sizes)


def views(flat: FlatWeights) -> dict[str, torch.Tensor]:
    return {
        n: flat.buffer[o : o + flat.shapes[n].numel()].view(flat.shapes[n]) for n, o in flat.offsets.items()
    }


def random_delta(flat: FlatWeights, drop_rate: float, seed: int, block: int = 1) -> PreparedDelta:
    """A DARE delta: the seeded mask (entries, or aligned runs of `block`), small random values."""
    gen = torch.Generator().manual_seed(seed)
    ops = []
    for name, shape in flat.shapes.items():
        index = seeded_keep_blocks(shape.numel(), 1.0 - drop_rate, seed, name, block)
        values = (torch.randn(index.numel(), generator=gen) * 1e-3).to(flat.buffer.dtype)
        ops.append(PatchOp(name, index.to(flat.buffer.device), values.to(flat.buffer.device)))
    return PreparedDelta(f"p{drop_rate}", None, tuple(ops))  # type: ignore[arg-type]


def runs_of(prepared: PreparedDelta) -> int:
    """Maximal runs of consecutive kept positions (the least index data a write must read: one per run)."""
    return sum(Runs.of(op.index).count for op in prepared.ops if op.index is not None)


def touched_lines(flat: FlatWeights, prepared: PreparedDelta) -> torch.Tensor:
    """The first flat position of each distinct 64-byte weight line holding a kept position (tensors start
    line-aligned), sorted."""
    per_line = LINE // flat.buffer.element_size()
    starts = []
    for op in prepared.ops:
        assert op.index is not None
        lines = torch.unique_consecutive(op.index.cpu() // per_line)
        starts.append(flat.offsets[op.target] + lines * per_line)
    return torch.cat(starts).to(flat.buffer.device)


def thp_mode() -> str:
    """The OS's transparent huge page mode (`madvise`: only memory that asks, as host_zeros does)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@functools.cache
def _copy_pair(device: torch.device, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    # allocated once: huge-page faults (and the kernel's compaction for them) stay out of every later rep
    if device.type == "cpu":
        src, dst = (
            host_zeros(nbytes // 4, torch.float32)[0].normal_(),
            host_zeros(nbytes // 4, torch.float32)[0],
        )
    else:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
        dst = torch.empty_like(src)
    dst.copy_(src)
    return src, dst


def bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large device tensor copy, read + write counted (host memory as the server allocates it).
    Also what evicts the weights from the caches before each timed swap."""
    src, dst = _copy_pair(device, nbytes)
    return 2 * src.nbytes / min(timed(lambda: dst.copy_(src), device) for _ in range(3))


def measure(
    flat: FlatWeights, prepared: PreparedDelta, reps: int, device: torch.device, bw_bytes: int
) -> dict[str, Any]:
    """The server's swap path vs the bound and vs full copies, interleaved rep by rep; checks bit-exactness."""
    weights = views(flat)
    swaps = SwapManager(weights, ServerMetrics(), flat)
    served = serve_delta(prepared, weights, flat, None, swaps.base_values)
    original = flat.buffer.clone()
    finetuned_host = host_clone(_canonical(original, served.flat).cpu())  # what a full-copy server holds
    pinned = finetuned_host.pin_memory() if device.type == "cuda" else None
    host_tensors = {
        n: finetuned_host[o : o + flat.shapes[n].numel()].view(flat.shapes[n])
        for n, o in flat.offsets.items()
    }
    # the same swap path over a copy of the weights on ordinary 4 KiB pages (torch's allocator): the same
    # delta, so it isolates what host_zeros' huge pages change
    small = FlatWeights(flat.buffer.clone(), flat.offsets, flat.shapes) if device.type == "cpu" else None
    small_swaps = SwapManager(views(small), ServerMetrics(), small) if small is not None else None
    swaps.activate(("d", 1), served)
    exact_apply = torch.equal(flat.buffer, finetuned_host.to(device))
    swaps.deactivate()
    exact_restore = torch.equal(flat.buffer, original)
    lines = touched_lines(flat, prepared)
    samples: dict[str, list[float]] = {
        k: [] for k in ("apply", "restore", "full_copy", "full_copy_per_tensor", "pinned_h2d", "bw", "small",
                        "touch_cold", "touch_warm")
    }  # fmt: skip
    for _ in range(reps):
        # the access floor: read one value from every touched line, from the same cold start, then again
        bandwidth(device, bw_bytes)
        samples["touch_cold"].append(timed(lambda: flat.buffer.index_select(0, lines), device))
        samples["touch_warm"].append(timed(lambda: flat.buffer.index_select(0, lines), device))
        samples["bw"].append(bandwidth(device, bw_bytes))
        samples["apply"].append(timed(lambda: swaps.activate(("d", 1), served), device))
        samples["restore"].append(timed(swaps.deactivate, device))
        if small_swaps is not None:
            bandwidth(device, bw_bytes)  # the same cold start as the server path's
            samples["small"].append(
                timed(lambda: (small_swaps.activate(("d", 1), served), small_swaps.deactivate()), device)
            )
        samples["full_copy"].append(timed(lambda: flat.buffer.copy_(finetuned_host), device))
        samples["full_copy_per_tensor"].append(
            timed(lambda: [weights[n].copy_(t) for n, t in host_tensors.items()], device)
        )
        if pinned is not None:
            samples["pinned_h2d"].append(timed(lambda: flat.buffer.copy_(pinned, non_blocking=True), device))
        flat.buffer.copy_(original)
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    nnz = served.flat.index.numel()
    size = flat.buffer.element_size()
    nlines = lines.numel()
    runs = runs_of(prepared)
    apply_bytes = runs * 4 + nnz * size + 2 * nlines * LINE  # int32 per run, kept values, touched lines r+w
    restore_bytes = runs * 4 + nnz * size + 2 * nlines * LINE  # int32 per run, originals, touched lines r+w
    bound_s = (apply_bytes + restore_bytes) / med["bw"]
    swap_s = med["apply"] + med["restore"]
    full_s = min(med["full_copy"], med["full_copy_per_tensor"])
    out = {
        "params": flat.buffer.numel(), "nnz": nnz, "density": nnz / flat.buffer.numel(), "runs": runs,
        "touched_line_fraction": nlines * LINE / flat.buffer.nbytes, "bandwidth_gb_s": med["bw"] / 1e9,
        "apply_s": med["apply"], "restore_s": med["restore"], "bound_s": bound_s,
        "ratio_to_limit": swap_s / bound_s, "full_copy_s": full_s, "speedup_vs_full_copy": full_s / swap_s,
        "bound_speedup_vs_full_copy": full_s / bound_s, "bit_exact": exact_apply and exact_restore,
    }  # fmt: skip
    out["touch_floor_s"] = med["touch_cold"] + med["touch_warm"]
    out["ratio_to_touch_floor"] = swap_s / out["touch_floor_s"]
    if "small" in med:
        out["small_pages_s"] = med["small"]
        out["huge_page_gain"] = med["small"] / swap_s
    if "pinned_h2d" in med:
        out["pinned_h2d_s"] = med["pinned_h2d"]
        out["speedup_vs_pinned_h2d"] = med["pinned_h2d"] / swap_s
    return out


def _canonical(original: torch.Tensor, delta: Any) -> torch.Tensor:
    """deltas_store's arithmetic on a copy: w[i] = w[i] + v[i] in the weight dtype."""
    out = original.clone()
    index = delta.index.long()
    out.index_copy_(0, index, out.index_select(0, index) + delta.values)
    return out


def compare_kernels(
    flat: FlatWeights, prepared: PreparedDelta, reps: int, device: torch.device
) -> dict[str, Any]:
    """Apply + restore seconds and bit-exactness of each way to patch the same delta."""
    weights = views(flat)
    served = serve_delta(prepared, weights, flat, None, lambda index: gather_bits(flat.buffer, index))
    fd = served.flat
    assert fd is not None
    original = flat.buffer.clone()
    expected = _canonical(original, fd)
    stored = [
        (op.target, op.index.int(), op.values.float()) for op in prepared.ops if op.index is not None
    ]  # as on disk
    scatter = WRITE_KERNELS["scatter"]

    def per_tensor() -> Callable[[], None]:
        saved = apply_delta_(weights, prepared)
        return lambda: restore_(saved)

    def per_call_conversions() -> Callable[[], None]:  # nothing prepared at load: convert on every swap
        ops = tuple(PatchOp(n, i.long(), v.to(flat.buffer.dtype)) for n, i, v in stored)
        saved = apply_delta_(weights, PreparedDelta("c", None, ops))  # type: ignore[arg-type]
        return lambda: restore_(saved)

    def gather_add_scatter() -> Callable[[], None]:  # flat, originals gathered and summed on every swap
        saved = gather_bits(flat.buffer, fd.index)
        scatter.write_(flat.buffer, fd.index, saved + fd.values)
        return lambda: scatter.write_(flat.buffer, fd.index, saved)

    def index_add() -> Callable[[], None]:
        saved = gather_bits(flat.buffer, fd.index)
        flat.buffer.index_add_(0, fd.index, fd.values)
        return lambda: scatter.write_(flat.buffer, fd.index, saved)

    def precomputed(
        name: str, index: torch.Tensor, runs: Runs | None = None
    ) -> Callable[[], Callable[[], None]]:
        kernel = WRITE_KERNELS[name]

        def run() -> Callable[[], None]:
            kernel.write_(flat.buffer, index, fd.patched, runs)
            return lambda: kernel.write_(flat.buffer, index, fd.originals, runs)

        return run

    variants: dict[str, Callable[[], Callable[[], None]]] = {
        "per-tensor deltas_store (old server path)": per_tensor,
        "per-tensor, per-call conversions": per_call_conversions,
        "flat gather+add+scatter per swap": gather_add_scatter,
        "flat gather + index_add_": index_add,
    }
    for name in WRITE_KERNELS:
        variants[f"precomputed {name} int64"] = precomputed(name, fd.index, fd.runs)
    variants["precomputed scatter int32"] = precomputed("scatter", fd.index.int())
    # the server uses runs when the mask has them; this is the same kernel value by value
    variants["precomputed native, per value"] = precomputed("native", fd.index)
    results: dict[str, dict[str, Any]] = {}
    for name, run in variants.items():
        undo = run()
        exact = torch.equal(flat.buffer, expected)
        undo()
        results[name] = {"bit_exact": exact and torch.equal(flat.buffer, original), "samples": []}
    for _ in range(reps):  # interleaved: machine load drifts over all variants alike
        for name, run in variants.items():
            results[name]["samples"].append(timed(lambda run=run: run()(), device))  # type: ignore[misc]
    for r in results.values():
        r["apply_restore_s"] = statistics.median(r.pop("samples"))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 layers of Linear weights, fewer reps")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument(
        "--mask-blocks", default="1,16", help="comma-separated mask blocks (1 = element masks; default 1,16)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    reps = args.reps or (3 if args.quick else 5)
    shapes = select(smollm2_shapes(), 6 if args.quick else None)
    drop_rates = (0.9, 0.99, 0.999)
    bw_bytes = (64 if args.quick else 256) << 20
    rows: list[dict[str, Any]] = []
    kernels: list[dict[str, Any]] = []
    blocks = [int(b) for b in args.mask_blocks.split(",")]
    for dname, dtype in DTYPES.items():
        flat = flat_weights(shapes, dtype, device)
        for p, block in ((p, b) for p in drop_rates for b in blocks):
            prepared = random_delta(flat, p, seed=int(p * 1000), block=block)
            r = {
                "dtype": dname,
                "drop_rate": p,
                "block": block,
                **measure(flat, prepared, reps, device, bw_bytes),
            }
            rows.append(r)
            print(f"dtype={dname} p={p} block={block} apply_ms={r['apply_s'] * 1e3:.2f} restore_ms={r['restore_s'] * 1e3:.2f} "
                  f"bound_ms={r['bound_s'] * 1e3:.2f} ratio_to_limit={r['ratio_to_limit']:.2f} "
                  f"ratio_to_touch_floor={r['ratio_to_touch_floor']:.2f} "
                  f"full_copy_ms={r['full_copy_s'] * 1e3:.2f} speedup_vs_full_copy={r['speedup_vs_full_copy']:.2f} "
                  f"huge_page_gain={r.get('huge_page_gain', float('nan')):.2f} "
                  f"bit_exact={r['bit_exact']}", flush=True)  # fmt: skip
            if p in (0.99, 0.999):
                k = {"dtype": dname, "drop_rate": p, "block": block,
                     "kernels": compare_kernels(flat, prepared, reps, device)}  # fmt: skip
                kernels.append(k)
                best = min(k["kernels"].items(), key=lambda kv: kv[1]["apply_restore_s"])
                print(f"  kernels dtype={dname} p={p} block={block}: " + ", ".join(
                    f"{n}={v['apply_restore_s'] * 1e3:.1f}ms{'' if v['bit_exact'] else ' (NOT exact)'}"
                    for n, v in k["kernels"].items()) + f"; fastest: {best[0]}", flush=True)  # fmt: skip
        del flat
    meta = {
        "device": str(device), "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "params": rows[0]["params"], "quick": args.quick, "reps": reps,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "server_kernel": DEFAULT_KERNEL, "transparent_hugepage": thp_mode(),
    }  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / ("swap-quick" if args.quick else "swap")
    write_results(out, {"meta": meta, "results": rows, "kernels": kernels}, render(meta, rows, kernels))
    return 0


def render(meta: dict[str, Any], rows: list[dict[str, Any]], kernels: list[dict[str, Any]]) -> str:
    gpu = "pinned H2D ms | vs pinned | " if meta["cuda"] else ""
    small = "4 KiB pages ms | huge-page gain | " if any("small_pages_s" in r for r in rows) else ""
    lines = [
        f"# deltaserve hot-swap benchmark ({meta['cuda'] or 'cpu'}, {meta['threads']} threads)",
        "",
        f"SmolLM2-135M-shaped weights ({meta['params'] / 1e6:.1f}M parameters{', 6 layers of Linear weights' if meta['quick'] else ''}), "
        f"seeded DARE masks (block 1: entry by entry; block 16: aligned runs of 16 entries, `--mask-block 16`); "
        f"median of {meta['reps']} interleaved reps. Server path: one `{meta['server_kernel']}` "
        "of precomputed patched values (apply) or originals (restore) over the flat buffer. Bound = (kept values + "
        "one int32 per run of consecutive kept positions + touched 64-byte weight lines read and written, in apply and in restore) / copy "
        "bandwidth measured in the same run. Full copy = a whole "
        "fine-tuned weight set copied from host memory into the resident tensors (best of one flat copy and "
        "per-tensor copies). `bound speedup` = the most any swap kernel could gain over the full copy. "
        "Host buffers (weights, full fine-tuned copies, the bandwidth copy) are allocated as the server "
        f"allocates its weights: `host_zeros`, transparent huge pages where offered (THP mode here: "
        f"`{meta.get('transparent_hugepage', '?')}`); `4 KiB pages ms` = apply + restore through the same path over a copy of the weights on torch's ordinary pages, measured interleaved from the same cold start. "
        "`touch floor` = reading one value from each touched weight line (`index_select`) from the same cold start, "
        "then again warm, as a restore follows an apply: what merely reaching the lines costs on this machine, which "
        "the bandwidth bound cannot see when few scattered lines leave the memory system latency-bound.",
        "",
        f"| dtype | p | block | density | touched lines | apply ms | restore ms | bound ms | ratio_to_limit | "
        "touch floor ms | ratio_to_touch_floor | full copy ms | "
        f"{gpu}speedup_vs_full_copy | bound speedup | {small}bit-exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if gpu else "") + "---:|---:|"
        + ("---:|---:|" if small else "") + "---|",
    ]  # fmt: skip
    for r in rows:
        extra = f"{r['pinned_h2d_s'] * 1e3:.1f} | {r['speedup_vs_pinned_h2d']:.1f}x | " if gpu else ""
        pages = (
            f"{r['small_pages_s'] * 1e3:.2f} | {r['huge_page_gain']:.2f}x | " if "small_pages_s" in r else ""
        )
        lines.append(
            f"| {r['dtype']} | {r['drop_rate']} | {r.get('block', 1)} | {r['density']:.4f} | {r['touched_line_fraction']:.1%} | "
            f"{r['apply_s'] * 1e3:.2f} | {r['restore_s'] * 1e3:.2f} | {r['bound_s'] * 1e3:.2f} | "
            f"{r['ratio_to_limit']:.2f} | {r['touch_floor_s'] * 1e3:.2f} | {r['ratio_to_touch_floor']:.2f} | "
            f"{r['full_copy_s'] * 1e3:.1f} | {extra}{r['speedup_vs_full_copy']:.2f}x | "
            f"{r['bound_speedup_vs_full_copy']:.2f}x | {pages}{r['bit_exact']} |"
        )
    lines += ["", "## Kernels (apply + restore ms, same delta, interleaved)", ""]
    names = list(kernels[0]["kernels"]) if kernels else []
    lines.append("| dtype | p | block | " + " | ".join(names) + " |")
    lines.append("|---|---:|---:|" + "---:|" * len(names))
    for k in kernels:
        cells = [
            f"{v['apply_restore_s'] * 1e3:.1f}{'' if v['bit_exact'] else ' ✗'}" for v in k["kernels"].values()
        ]
        lines.append(f"| {k['dtype']} | {k['drop_rate']} | {k.get('block', 1)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("✗ = not bit-exact (apply must equal deltas_store's arithmetic, restore the original bits).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
