"""Mixed-batch side products: ways to compute every row's x·ΔWᵀ for one Linear, vs the base GEMM, one run.

For SmolLM2-135M's Linear shapes (one decoder layer: q, k, v, o, gate, up, down), B rows whose deltas follow
a mix, random DARE masks at drop rate p, decode (T=1) and prefill (T=16) inputs. Interleaved medians of:

  * base          — the dense GEMM x·Wᵀ itself (what the side product is added to);
  * torch-ops     — `server.engine.mixed.kernels` (the server's path on GPUs, or on a CPU without the C++
                    kernels): rows grouped per delta in chunks of the width its cost model picks, one
                    block-diagonal CSR `torch.sparse.mm`;
  * width=1 / max — the same with one row per chunk / one chunk per delta;
  * loop          — one `torch.sparse.mm` per delta (the Python loop the server avoids);
  * bmm           — `torch.bmm` of a 3-D sparse COO over deltas, rows padded to the largest group;
  * gather        — index_select of x by column, multiply, index_add_ by row (COO, padded groups);
  * native        — deltas_store.native's C++ side_linear_ (what the server runs on CPU once it is built):
                    one call per Linear, each delta's kept values loaded once for all of its rows.

    python bench/mixed.py --quick --threads 1     # decode only, two mixes, under a minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltas_store import native  # noqa: E402
from server.engine.mixed.kernels import Chunking, block_diagonal, grouped_side, plan_chunks  # noqa: E402
from server.engine.mixed.layout import SparseRows, _csr  # noqa: E402

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)


def mixes(rows: int) -> dict[str, list[int]]:
    rng = random.Random(0)
    zipf = [1.0 / (k + 1) ** 1.1 for k in range(64)]
    return {
        "uniform16": [b % 16 for b in range(rows)],
        "zipf64": rng.choices(range(64), weights=zipf, k=rows),
        "four": [b % 4 for b in range(rows)],
        "one": [0] * rows,
    }


Delta = tuple[
    SparseRows, torch.Tensor, torch.Tensor
]  # the server's CSR, dense ΔW (out, in), torch's CSR of it


def side_kernels(
    deltas: list[Delta], row_delta: list[int], x: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    """Each way to compute (B, T, out) side products for rows `row_delta` (all rows have a delta here)."""
    shape = deltas[0][0].shape
    used = sorted(set(row_delta))
    nnz = [d[0].nnz for d in deltas]

    def chunked(width: int | None) -> Callable[[], torch.Tensor]:
        plan = plan_chunks(row_delta, nnz)
        if width is not None:  # force a width: rebuild the plan's slots by hand
            plan = _forced(row_delta, width)
        matrix = block_diagonal([deltas[d][0] for d in plan.chunks], shape)
        slot_row = [0] * (len(plan.chunks) * plan.width)
        for row, slot in enumerate(plan.row_slot):
            slot_row[slot] = row
        slots = torch.tensor(plan.row_slot)
        args = (torch.tensor(slot_row), slots // plan.width, slots % plan.width)
        assert matrix is not None
        return lambda: grouped_side(matrix, x, plan.width, *args)

    def loop() -> torch.Tensor:
        out = x.new_zeros(x.shape[0], x.shape[1], shape[0])
        for d in used:
            rows = torch.tensor([b for b, r in enumerate(row_delta) if r == d])
            xr = x.index_select(0, rows).reshape(-1, shape[1])  # (R*T, in)
            out.index_copy_(0, rows, torch.sparse.mm(deltas[d][2], xr.T).T.reshape(len(rows), -1, shape[0]))
        return out

    groups = {d: [b for b, r in enumerate(row_delta) if r == d] for d in used}
    most = max(len(g) for g in groups.values())
    coo = torch.stack([deltas[d][1] for d in used]).to_sparse()  # (G, out, in)
    slot = torch.tensor([used.index(r) * most + groups[r].index(b) for b, r in enumerate(row_delta)])

    def bmm() -> torch.Tensor:
        xp = x.new_zeros(len(used) * most, x.shape[1], shape[1])
        xp[slot] = x
        xp = xp.view(len(used), most * x.shape[1], shape[1]).transpose(1, 2)  # (G, in, most*T)
        y = torch.bmm(coo, xp).transpose(1, 2).reshape(len(used) * most, x.shape[1], shape[0])
        return y[slot]

    ind = coo.coalesce().indices()
    src, dst, val = ind[0] * shape[1] + ind[2], ind[0] * shape[0] + ind[1], coo.coalesce().values()

    def gather() -> torch.Tensor:
        xp = x.new_zeros(len(used) * most, x.shape[1], shape[1])
        xp[slot] = x
        cols = xp.view(len(used), most * x.shape[1], shape[1]).transpose(1, 2).reshape(-1, most * x.shape[1])
        y = x.new_zeros(len(used) * shape[0], most * x.shape[1]).index_add_(0, dst, cols[src] * val[:, None])
        y = y.view(len(used), shape[0], most * x.shape[1]).transpose(1, 2).reshape(-1, x.shape[1], shape[0])
        return y[slot]

    kernels = {"torch-ops": chunked(None), "width=1": chunked(1), "width=max": chunked(most), "loop": loop,
               "bmm": bmm, "gather": gather}  # fmt: skip
    kernels_native = native.module()
    if kernels_native is not None:
        slot_rows = torch.tensor([b for d in used for b in groups[d]])
        slot_ptr = torch.tensor([0, *itertools.accumulate(len(groups[d]) for d in used)])
        csr = [deltas[d][0] for d in used]
        crows, cols, vals = [c.crow for c in csr], [c.col for c in csr], [c.values for c in csr]
        kept = [c.row if c.row is not None else torch.empty(0, dtype=torch.int16) for c in csr]
        slots = native.SlotTable(
            kernels_native, crows, cols, vals, kept, [shape[0]] * len(csr)
        )  # once per delta set
        out = x.new_zeros(x.shape[0], x.shape[1], shape[0])

        def run_native() -> torch.Tensor:
            kernels_native.side_linear_(out, x, slots.table, slot_ptr, slot_rows)
            return out

        kernels["native"] = run_native
    return kernels


def _forced(row_delta: list[int], width: int) -> Chunking:
    chunks: list[int] = []
    first: dict[int, int] = {}
    used: dict[int, int] = {}
    for d in sorted(set(row_delta)):
        first[d] = len(chunks)
        chunks.extend([d] * -(-row_delta.count(d) // width))
    slots = []
    for d in row_delta:
        j = used.get(d, 0)
        used[d] = j + 1
        slots.append((first[d] + j // width) * width + j % width)
    return Chunking(width, tuple(chunks), tuple(slots))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--tokens", type=int, nargs="+", help="T values (default: 1, and 16 unless --quick)")
    parser.add_argument("--mix", nargs="+", choices=tuple(mixes(1)), help="request mixes to run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    tokens = tuple(args.tokens or ((1,) if args.quick else (1, 16)))
    drop_rates = (0.99,) if args.quick else (0.99, 0.999)
    mix_names = tuple(args.mix or (("uniform16", "zipf64") if args.quick else mixes(args.rows)))
    gen = torch.Generator().manual_seed(0)
    rows_out: list[dict[str, Any]] = []
    for p in drop_rates:
        layers = []
        for out_f, in_f in SHAPES:
            weight = torch.randn(out_f, in_f, generator=gen)
            deltas = []
            for _ in range(64):
                index = (torch.rand(out_f * in_f, generator=gen) >= p).nonzero().squeeze(1)
                values = torch.randn(index.numel(), generator=gen) * 1e-3
                rows = _csr(index, values, (out_f, in_f), torch.device("cpu"))
                dense = torch.zeros(out_f * in_f).index_copy_(0, index, values).view(out_f, in_f)
                deltas.append((rows, dense, dense.to_sparse_csr()))
            layers.append((weight, deltas))
        for mix in mix_names:
            row_delta = mixes(args.rows)[mix]
            for t in tokens:
                samples: dict[str, list[float]] = {}
                for _ in range(reps):  # interleaved
                    totals: dict[str, float] = {}
                    for weight, deltas in layers:
                        x = torch.randn(args.rows, t, weight.shape[1], generator=gen)
                        kernels = {"base": lambda w=weight, x=x: torch.nn.functional.linear(x, w)}
                        kernels |= side_kernels(deltas, row_delta, x)
                        for name, fn in kernels.items():
                            fn()  # warm (and builds nothing: layouts are prepared above)
                            totals[name] = totals.get(name, 0.0) + timed(fn)
                    for name, v in totals.items():
                        samples.setdefault(name, []).append(v)
                med = {k: statistics.median(v) for k, v in samples.items()}
                row = {"drop_rate": p, "mix": mix, "tokens": t, "deltas": len(set(row_delta)),
                       **{f"{k}_ms": v * 1e3 for k, v in med.items()}}  # fmt: skip
                rows_out.append(row)
                print(
                    f"p={p} mix={mix} T={t} " + " ".join(f"{k}={v * 1e3:.2f}ms" for k, v in med.items()),
                    flush=True,
                )
    out = ROOT / "bench" / "results" / ("mixed-quick" if args.quick else "mixed")
    out.with_suffix(".json").write_text(
        json.dumps({"threads": torch.get_num_threads(), "rows": rows_out}, indent=2)
    )
    names = [k for k in rows_out[0] if k.endswith("_ms")]
    lines = [
        f"# Mixed-batch side products ({args.rows} rows, one SmolLM2 layer's 7 Linears, cpu, "
        f"{torch.get_num_threads()} threads)",
        "",
        "Milliseconds per layer (median of interleaved reps). `base` is the dense GEMM the side product is added",
        "to; `native` is what the server runs on CPU (deltas_store.native), `torch-ops` its fallback (and GPU path).",
        "",
        "| p | mix | distinct deltas | T | " + " | ".join(n[:-3] for n in names) + " |",
        "|---:|---|---:|---:|" + "---:|" * len(names),
    ]
    for r in rows_out:
        lines.append(f"| {r['drop_rate']} | {r['mix']} | {r['deltas']} | {r['tokens']} | "
                     + " | ".join(f"{r[n]:.2f}" for n in names) + " |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
