"""Serving benchmark: tokens/s and p50/p99 latency with 1, 4 and 16 deltas vs the base alone, in one run.

Each scenario sends the same number of requests through a live server (uvicorn on loopback, real HTTP),
every request naming a model drawn uniformly at random from the scenario's set. Writes
bench/results/serve.md (table) and bench/results/serve.json (raw numbers).

    python bench/serve.py --quick          # tiny random Llama, under a minute on a laptop CPU
    python bench/serve.py --model small    # a larger random Llama
    python bench/serve.py --model smollm2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltas_store import CompressOptions, DeltaStore, compress  # noqa: E402
from server.app import create_app  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.models import perturb, write_tokenizer  # noqa: E402

BASE_ID = "base"
PROMPTS = [
    "The quick brown fox",
    "Fine-tuned variants of one base model",
    "Hello world! How are you today?",
    "A sparse delta stores only what changed",
]


def write_random_llama(out: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=320, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 1), num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    write_tokenizer(out)
    return out


def base_model(kind: str, root: Path) -> Path:
    if kind == "tiny":
        return write_random_llama(root / "base", hidden=64, layers=2)
    if kind == "small":
        return write_random_llama(root / "base", hidden=512, layers=8)
    from deltas_store.embedded import embedded_base_dir

    return Path(embedded_base_dir())


def build_store(base: Path, root: Path, n: int, drop_rate: float) -> Path:
    store = DeltaStore(root / "store")
    for i in range(n):
        ft = perturb(base, root / f"ft-{i}", scale=0.05, seed=100 + i)
        out = root / f"d-{i}.safetensors"
        compress(CompressOptions(base, ft, out, method="dare", drop_rate=drop_rate, seed=i))
        store.put(f"d{i}", out, move=True)
        for f in ft.iterdir():
            f.unlink()
        ft.rmdir()
    return root / "store"


def start(settings: ServerSettings) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return url, server, thread
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def run_scenario(
    url: str, models: list[str], requests: int, concurrency: int, max_tokens: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    jobs = [(rng.choice(models), rng.choice(PROMPTS)) for _ in range(requests)]
    client = httpx.Client(base_url=url, timeout=600)

    def one(job: tuple[str, str]) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.post("/v1/completions", json={"model": job[0], "prompt": job[1], "max_tokens": max_tokens,
                                                 "temperature": 0, "ignore_eos": True})  # fmt: skip
        r.raise_for_status()
        return time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])

    before = _swaps(client)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    swaps = _swaps(client) - before
    client.close()
    return {"models": len(models), "latencies": [lat for lat, _ in results], "tokens": sum(n for _, n in results),
            "wall_s": wall, "swaps": swaps}  # fmt: skip


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = sorted(lat for run in runs for lat in run["latencies"])
    tokens = sum(run["tokens"] for run in runs)
    wall = sum(run["wall_s"] for run in runs)
    return {
        "models": runs[0]["models"],
        "requests": len(latencies),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "swaps": sum(run["swaps"] for run in runs),
        "rounds": [{k: v for k, v in run.items() if k != "latencies"} for run in runs],
    }


def _swaps(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("deltaserve_swaps_total "):
            return float(line.split()[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests (under a minute)")
    parser.add_argument("--model", choices=["tiny", "small", "smollm2"], default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--drop-rate", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per scenario")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve")
    args = parser.parse_args()
    kind = args.model or ("tiny" if args.quick else "small")
    requests = args.requests or (32 if args.quick else 192)
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    args.rounds = args.rounds or (2 if args.quick else 4)

    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-") as tmp:
        root = Path(tmp)
        base = base_model(kind, root)
        store = build_store(base, root, 16, args.drop_rate)
        settings = ServerSettings(
            base=base, store=store, device=args.device, dtype=args.dtype, model_id=BASE_ID,
            max_batch_size=args.max_batch_size, max_queue=4096, log_level="warning",
        )  # fmt: skip
        url, server, thread = start(settings)
        try:
            run_scenario(url, [BASE_ID], min(requests, 16), args.concurrency, max_tokens, seed=0)  # warm-up
            scenarios = {"base only": [BASE_ID]}
            scenarios.update({f"{n} deltas": [f"d{i}" for i in range(n)] for n in (1, 4, 16)})
            # Interleaved rounds, so drift in machine load hits every scenario alike.
            rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in scenarios}
            for r in range(args.rounds):
                for label, models in scenarios.items():
                    rounds[label].append(
                        run_scenario(
                            url, models, requests // args.rounds, args.concurrency, max_tokens, seed=r
                        )
                    )
            results = {label: merge(runs) for label, runs in rounds.items()}
        finally:
            server.should_exit = True
            thread.join(60)

    meta = {
        "model": kind, "rounds": args.rounds, "device": args.device, "dtype": args.dtype, "requests": requests, "max_tokens": max_tokens,
        "concurrency": args.concurrency, "max_batch_size": args.max_batch_size, "drop_rate": args.drop_rate,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    base_tps = results["base only"]["tokens_per_s"]
    lines = [
        f"# deltaserve serving benchmark ({kind} model, {meta['cuda'] or 'cpu'})",
        "",
        f"{requests} requests per scenario in {args.rounds} interleaved rounds, {args.concurrency} concurrent "
        f"clients, {max_tokens} tokens each (greedy, ignore_eos), max batch {args.max_batch_size}, DARE deltas at drop rate {args.drop_rate}; models drawn "
        "uniformly at random per request.",
        "",
        "| scenario | tokens/s | vs base | p50 latency (s) | p99 latency (s) | swaps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base_tps:.2f}x | {r['p50_s']:.3f} | "
            f"{r['p99_s']:.3f} | {int(r['swaps'])} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
