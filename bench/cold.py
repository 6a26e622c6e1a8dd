"""Cold start: a request for a delta that is only on disk, to its first token, vs loading a full fine-tune.

Ours: the server's runtime (built as `deltaserve serve` builds it; requests go through its scheduler, not
HTTP, so that no side pays for a network stack) gets a request for a delta it has never loaded: the time
to first token includes reading, verifying and laying out the delta, the swap and the prefill. Each cold
delta is requested once; the same request again gives the warm figure.

Baselines, in the same run, on the same fine-tunes written out whole by `deltaserve apply`:
  * full load — transformers `from_pretrained` of the fine-tuned directory, then the first token;
  * full copy — what a server without deltas does on a miss: read the fine-tune's safetensors and copy
    every tensor into its resident model, then the first token.
Files were just written, so both sides read them from the OS page cache (the fair, optimistic case).
The baselines run on the server's worker thread (between its batches) and the setup on threads that end with
it, so the process keeps one OpenMP pool throughout, as `deltaserve serve` does (server.engine.threads).

    python bench/cold.py --quick --threads 1    # tiny Llama, under a minute
    python bench/cold.py                        # SmolLM2-135M (the embedded base)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_io import write_results  # noqa: E402
from bench.serve import BASE_ID, base_model  # noqa: E402
from deltas_store import CompressOptions, DeltaStore, apply_to_dir, compress, read_delta  # noqa: E402
from server.engine.request import Finished, GenerationRequest, SamplingParams  # noqa: E402
from server.engine.threads import on_fresh_thread  # noqa: E402
from server.metrics import ServerMetrics  # noqa: E402
from server.runtime import Runtime, build_runtime  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.models import perturb  # noqa: E402

PROMPT = "Fine-tuned variants of one base model"
T = TypeVar("T")


class _FirstToken:
    """A request sink that records when the first token is chosen and when the request ends."""

    def __init__(self) -> None:
        self.first = 0.0
        self.done = threading.Event()
        self.error: BaseException | None = None

    def on_start(self) -> None:
        self.first = time.perf_counter()

    def on_text(self, text: str) -> None: ...

    def on_finish(self, result: Finished) -> None:
        self.done.set()

    def on_error(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


def first_token_s(runtime: Runtime, model: str) -> float:
    """Submit one greedy one-token request through the scheduler; seconds until its first token."""
    sink = _FirstToken()
    ids = runtime.engine.encode_prompt(PROMPT)
    t0 = time.perf_counter()
    runtime.scheduler.submit(
        [GenerationRequest(model, ids, SamplingParams(max_tokens=1, temperature=0.0), sink)]
    )
    sink.done.wait(600)
    if sink.error is not None:
        raise sink.error
    return sink.first - t0


def breakdown_s(runtime: Runtime, path: Path) -> dict[str, float]:
    """Where a cold load's time goes: deltas_store's read + decode, its checks, the server's layout."""
    loader = runtime.scheduler.loader
    t0 = time.perf_counter()
    # integrity checks and index decoding (seeded masks are regenerated here), on a thread of its own like
    # the server's background read
    delta = on_fresh_thread(read_delta, path)
    t1 = time.perf_counter()
    prepared = on_fresh_thread(loader.prepare, delta)
    t2 = time.perf_counter()
    runtime.scheduler.call(lambda: loader.serve(prepared)).result(600)  # reads the base: on the worker
    t3 = time.perf_counter()
    return {"read_decode": t1 - t0, "check_prepare": t2 - t1, "layout": t3 - t2}


def full_load_s(model_dir: Path, dtype: torch.dtype) -> float:
    """from_pretrained + tokenizer + one greedy token (what a server without deltas pays per cold model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.inference_mode():
        model(**tok(PROMPT, return_tensors="pt"), logits_to_keep=1).logits.argmax(-1)
    return time.perf_counter() - t0


def full_copy_s(model_dir: Path, resident: torch.nn.Module, ids: torch.Tensor) -> float:
    """Read the fine-tune's safetensors and copy every tensor into a resident model, then one token."""
    from safetensors.torch import load_file

    params = dict(resident.named_parameters())
    t0 = time.perf_counter()
    with torch.no_grad():
        for file in sorted(model_dir.glob("*.safetensors")):
            for name, tensor in load_file(file).items():
                if name in params:
                    params[name].copy_(tensor)
        resident(input_ids=ids, logits_to_keep=1).logits.argmax(-1)
    return time.perf_counter() - t0


def setup(kind: str, root: Path, n: int, drop_rate: float) -> tuple[Path, list[Path]]:
    """The base, `n` compressed fine-tunes in a store under `root`, and each fine-tune applied whole."""
    base = base_model(kind, root)
    store = DeltaStore(root / "store")
    applied = []
    for i in range(n):
        ft = perturb(base, root / f"ft-{i}", scale=0.05, seed=200 + i)
        path = compress(CompressOptions(base, ft, root / f"d{i}.safetensors", method="dare",
                                        drop_rate=drop_rate, seed=i)).path  # fmt: skip
        store.put(f"d{i}", path)
        applied.append(apply_to_dir(base, path, root / f"applied-{i}"))
    return base, applied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 cold deltas")
    parser.add_argument("--model", choices=["tiny", "small", "smollm2"], default=None)
    parser.add_argument("--deltas", type=int, default=None, help="cold deltas measured (each once)")
    parser.add_argument("--drop-rate", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.model or ("tiny" if args.quick else "smollm2")
    n = args.deltas or (3 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="deltaserve-cold-") as tmp:
        root = Path(tmp)
        base, applied = on_fresh_thread(setup, kind, root, n, args.drop_rate)
        delta_bytes = statistics.median(
            path.stat().st_size for path in (root / "store").rglob("*.safetensors")
        )
        full_bytes = statistics.median(
            sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in applied
        )
        settings = ServerSettings(base=base, store=root / "store", device="cpu", model_id=BASE_ID)
        runtime = on_fresh_thread(build_runtime, settings, ServerMetrics())
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def on_worker(fn: Callable[[], T]) -> T:
            return runtime.scheduler.call(fn).result(600)

        resident = on_worker(lambda: AutoModelForCausalLM.from_pretrained(base).eval())
        ids = AutoTokenizer.from_pretrained(base)(PROMPT, return_tensors="pt")["input_ids"]
        dtype = next(resident.parameters()).dtype
        samples: dict[str, list[float]] = {
            "cold": [],
            "warm": [],
            "base": [],
            "full_load": [],
            "full_copy": [],
        }
        parts: list[dict[str, float]] = []
        try:
            first_token_s(runtime, BASE_ID)  # the server's own warm-up
            for i in range(n):  # interleaved: each cold delta, then the baselines on the same fine-tune
                samples["cold"].append(first_token_s(runtime, f"d{i}"))
                samples["warm"].append(first_token_s(runtime, f"d{i}"))
                samples["base"].append(first_token_s(runtime, BASE_ID))
                samples["full_load"].append(on_worker(lambda i=i: full_load_s(applied[i], dtype)))
                samples["full_copy"].append(on_worker(lambda i=i: full_copy_s(applied[i], resident, ids)))
                parts.append(breakdown_s(runtime, root / f"d{i}.safetensors"))
        finally:
            runtime.scheduler.stop(60)
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        **{f"{k}_first_token_s": v for k, v in med.items()},
        "speedup_vs_full_load": med["full_load"] / med["cold"],
        "speedup_vs_full_copy": med["full_copy"] / med["cold"],
        "delta_file_bytes": delta_bytes, "full_model_bytes": full_bytes, "samples": samples,
        "cold_load_breakdown_s": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
    }  # fmt: skip
    meta = {"model": kind, "drop_rate": args.drop_rate, "cold_deltas": n, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / ("cold-quick" if args.quick else "cold")
    write_results(out, {"meta": meta, "result": result}, render(meta, result))
    return 0


def render(meta: dict[str, Any], r: dict[str, Any]) -> str:
    return "\n".join([
        f"# deltaserve cold start ({meta['model']} model, cpu, {meta['threads']} threads)",
        "",
        f"Median of {meta['cold_deltas']} cold deltas (DARE, drop rate {meta['drop_rate']}); delta file "
        f"{r['delta_file_bytes'] / 2**20:.2f} MiB vs full fine-tune {r['full_model_bytes'] / 2**20:.1f} MiB. "
        "Files in the OS page cache for both sides.",
        "",
        "| path | time to first token (s) |",
        "|---|---:|",
        f"| delta only on disk, through the server (cold) | {r['cold_first_token_s']:.3f} |",
        f"| same delta again (warm: cached, already patched in) | {r['warm_first_token_s']:.3f} |",
        f"| base model through the server (one restore) | {r['base_first_token_s']:.3f} |",
        f"| full fine-tune: from_pretrained + first token | {r['full_load_first_token_s']:.3f} |",
        f"| full fine-tune: safetensors copied into a resident model + first token | {r['full_copy_first_token_s']:.3f} |",
        "",
        "Where a cold delta load goes (s): " + ", ".join(f"{k} {v:.3f}" for k, v in r["cold_load_breakdown_s"].items())
        + " (read_decode = deltas_store's `read_delta`: checks, and for seeded masks their regeneration).",
        "",
        f"speedup_vs_full_load={r['speedup_vs_full_load']:.2f} speedup_vs_full_copy={r['speedup_vs_full_copy']:.2f}",
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
