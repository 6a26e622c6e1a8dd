"""One decode step of a mixed batch vs the base alone, in process: where a mixed step's extra time goes.

SmolLM2-135M (the embedded model, fp32), a batch of B rows (default 32) spread over N random DARE deltas
(p = 0.99 on every 2-D weight, random values; a uniform mix or Zipf(1.1) over 64), a 12-token prompt, then
decode steps. Interleaved medians of (for the prefill and for a decode step): the base forward alone; the same forward as a mixed batch (each row's
delta a side term); the native side kernel's share of the mixed step (timed around each call); the lm_head's
share of that; and one `begin` + `end` of the batch (what a join pays twice).

    python bench/step.py --quick          # 16 deltas uniform, fewer reps
    python bench/step.py                  # uniform16 and zipf64
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_io import write_results  # noqa: E402
from deltas_store import native  # noqa: E402
from deltas_store.embedded import embedded_base_dir  # noqa: E402
from deltas_store.patching import PatchOp, PreparedDelta  # noqa: E402
from server.engine.mixed.batch import MixedBatch  # noqa: E402
from server.engine.mixed.layout import MixedDelta, build_mixed  # noqa: E402
from server.engine.mixed.modules import find_param_uses  # noqa: E402


class _Row:
    def __init__(self, model: str) -> None:
        self.model = model


class _TimedKernels:
    """The native module with side_linear_ timed: decode calls (T = 1) and prefill calls apart."""

    def __init__(self, real: native.NativeKernels) -> None:
        self.real = real
        self.total = self.lm_head = self.prefill = 0.0

    def side_linear_(self, out: torch.Tensor, x: torch.Tensor, *args: Any) -> None:
        t0 = time.perf_counter()
        self.real.side_linear_(out, x, *args)
        elapsed = time.perf_counter() - t0
        if x.shape[1] > 1:
            self.prefill += elapsed
            return
        self.total += elapsed
        if out.shape[-1] > 10_000:  # the vocabulary-sized Linear
            self.lm_head += elapsed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def mix_names(mix: str, rows: int) -> list[str]:
    if mix == "uniform16":
        return [f"d{b % 16}" for b in range(rows)]
    zipf = [1.0 / (k + 1) ** 1.1 for k in range(64)]
    return [f"d{k}" for k in random.Random(0).choices(range(64), weights=zipf, k=rows)]


def random_deltas(model: torch.nn.Module, names: set[str], drop_rate: float) -> dict[str, MixedDelta | None]:
    uses = find_param_uses(model)
    weights = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    out: dict[str, MixedDelta | None] = {}
    for name in sorted(names):
        ops = []
        for target, weight in weights.items():
            if weight.dim() == 2:
                index = (torch.rand(weight.numel(), generator=gen) >= drop_rate).nonzero().squeeze(1)
                ops.append(PatchOp(target, index, torch.randn(index.numel(), generator=gen) * 1e-3))
        out[name] = build_mixed(PreparedDelta(name, None, tuple(ops)), uses, weights)  # type: ignore[arg-type]
    return out


def decode_ms(
    model: torch.nn.Module, batch: MixedBatch | None, rows: list[_Row], steps: int
) -> tuple[float, float]:
    """(ms of the 12-token prefill, median ms of the `steps` decode forwards after it)."""
    b = len(rows)
    ids = torch.randint(0, 1000, (b, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(b, 12, dtype=torch.long)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    times = []
    with torch.inference_mode():
        if batch is not None:
            batch.begin(rows, torch.device("cpu"))  # type: ignore[arg-type]
        try:
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, past_key_values=cache)
            prefill = time.perf_counter() - t0
            token = ids[:, -1:]
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
                t0 = time.perf_counter()
                model(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1,
                      past_key_values=cache)  # fmt: skip
                times.append(time.perf_counter() - t0)
        finally:
            if batch is not None:
                batch.end()
    return prefill * 1e3, statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    real = native.module()
    if real is None:
        print(
            "the native kernels are not built here: run `python -m deltas_store.native` first",
            file=sys.stderr,
        )
        return 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_base_dir(), dtype=torch.float32).eval()
    timed = _TimedKernels(real)
    native_module = native.module
    native.module = lambda: timed  # type: ignore[assignment,return-value]
    reps, steps = (2, 4) if args.quick else (4, 6)
    rows_out = []
    try:
        for mix in ("uniform16",) if args.quick else ("uniform16", "zipf64"):
            names = mix_names(mix, args.rows)
            deltas = random_deltas(model, set(names), 0.99)
            batch = MixedBatch(model, find_param_uses(model), deltas)
            rows = [_Row(n) for n in names]
            samples: dict[str, list[float]] = {}
            for _ in range(reps):  # interleaved
                prefill, step = decode_ms(model, None, rows, steps)
                samples.setdefault("base_ms", []).append(step)
                samples.setdefault("base_prefill_ms", []).append(prefill)
                timed.total = timed.lm_head = timed.prefill = 0.0
                prefill, step = decode_ms(model, batch, rows, steps)
                samples.setdefault("mixed_ms", []).append(step)
                samples.setdefault("mixed_prefill_ms", []).append(prefill)
                samples.setdefault("prefill_kernel_ms", []).append(timed.prefill * 1e3)
                samples.setdefault("kernel_ms", []).append(timed.total / steps * 1e3)
                samples.setdefault("lm_head_ms", []).append(timed.lm_head / steps * 1e3)
                t0 = time.perf_counter()
                batch.begin(rows, torch.device("cpu"))  # type: ignore[arg-type]
                batch.end()
                samples.setdefault("begin_end_ms", []).append((time.perf_counter() - t0) * 1e3)
            row: dict[str, Any] = {"mix": mix, "deltas": len(set(names))}
            row |= {k: statistics.median(v) for k, v in samples.items()}
            row["ratio"] = row["base_ms"] / row["mixed_ms"]
            row["prefill_ratio"] = row["base_prefill_ms"] / row["mixed_prefill_ms"]
            rows_out.append(row)
    finally:
        native.module = native_module  # type: ignore[method-assign]
    meta = {"rows": args.rows, "threads": torch.get_num_threads(), "drop_rate": 0.99, "reps": reps,
            "steps": steps, "torch": torch.__version__}  # fmt: skip
    lines = [
        f"# One mixed decode step vs the base (SmolLM2-135M fp32, {args.rows} rows, cpu, "
        f"{meta['threads']} threads)",
        "",
        "Median ms per decode step (interleaved reps). `kernel` = the native side products' share of the mixed "
        "step (of which `lm_head`); `begin+end` = laying the batch out and tearing it down once (a join does "
        "it twice); `ratio` = base / mixed step time. The same for the 12-token prefill before the steps (every "
        "row's prompt, one forward). Random DARE deltas at p = 0.99 on every 2-D weight (norms unchanged).",
        "",
        "| mix | distinct deltas | base | mixed | kernel | lm_head | begin+end | ratio | prefill base | prefill mixed | prefill kernel | prefill ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows_out:
        lines.append(f"| {r['mix']} | {r['deltas']} | {r['base_ms']:.1f} | {r['mixed_ms']:.1f} | "
                     f"{r['kernel_ms']:.1f} | {r['lm_head_ms']:.1f} | {r['begin_end_ms']:.1f} | "
                     f"{r['ratio']:.2f} | {r['base_prefill_ms']:.1f} | {r['mixed_prefill_ms']:.1f} | "
                     f"{r['prefill_kernel_ms']:.1f} | {r['prefill_ratio']:.2f} |")  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / ("step-quick" if args.quick else "step")
    write_results(out, {"meta": meta, "results": rows_out}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
