"""Serving benchmark: tokens/s, TTFT and latency over many deltas vs the base alone and a naive server, one run.

Servers (uvicorn on loopback, real HTTP, streamed completions), measured interleaved; by default each is its own
`deltaserve serve` process, as in production, so the load generator's 32 client threads do not contend for the
server's GIL, and the benchmark's own torch work (building the deltas) leaves no OpenMP pool in the server
(server.engine.threads; `--in-process` runs them all in this process instead, as earlier results did):

  * base    — requests for the base model only: the upper bound;
  * naive   — merged batches, and every switch copies a whole fine-tuned weight set (swap_mode=full);
  * merged  — merged batches, a sparse delta hot-swap per switch (batch_mode=merged);
  * mixed   — every batch mixes deltas as side products on the base (batch_mode=mixed);
  * auto    — the default: merged when one delta dominates the queue, mixed otherwise;
  * auto-static — auto without continuous batching (a request waits for the running batch to end);
  * base-static — the base alone without continuous batching.

`--lengths varied` draws each request's max_tokens from [max/4, 7·max/4] (the same draws for every mode),
as real traffic does; `fixed` (the default) gives every request max_tokens.

Scenarios: N deltas, a uniform or Zipf(1.1) request mix over them, C concurrent closed-loop clients. Each
configuration prints one line `mode=... deltas=N mix=... concurrency=C tokens_per_s=X ratio_to_base=R`
(the base-only figure at the same concurrency is R's denominator). Writes bench/results/serve.{md,json}
(serve-quick.* with --quick).

    python bench/serve.py --quick --threads 1     # tiny Llama, the two target scenarios, under a minute
    python bench/serve.py --model smollm2         # the full grid (long)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_io import write_results  # noqa: E402
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
MODES: dict[str, dict[str, Any]] = {
    "base": {"batch_mode": "merged"},
    "naive": {"batch_mode": "merged", "swap_mode": "full"},
    "merged": {"batch_mode": "merged"},
    "mixed": {"batch_mode": "mixed"},
    "auto": {"batch_mode": "auto"},
    "auto-static": {"batch_mode": "auto", "continuous_batching": False},
    "base-static": {"batch_mode": "merged", "continuous_batching": False},
}


@dataclass(frozen=True)
class Scenario:
    deltas: int
    mix: str  # uniform | zipf
    concurrency: int

    def models(self, mode: str, count: int, rng: random.Random) -> list[str]:
        if mode.startswith("base"):
            return [BASE_ID] * count
        names = [f"d{i}" for i in range(self.deltas)]
        weights = [1.0 / (k + 1) ** 1.1 for k in range(self.deltas)] if self.mix == "zipf" else None
        return rng.choices(names, weights=weights, k=count)


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


def build_store(base: Path, root: Path, n: int, distinct: int, drop_rate: float) -> Path:
    """`n` served deltas d0..d{n-1}; `distinct` real compressed fine-tunes, reused round-robin (every name is
    still loaded, cached, swapped and mixed on its own: the server never shares state between names)."""
    store = DeltaStore(root / "store")
    files = []
    for i in range(min(n, distinct)):
        ft = perturb(base, root / f"ft-{i}", scale=0.05, seed=100 + i)
        out = root / f"d-{i}.safetensors"
        compress(CompressOptions(base, ft, out, method="dare", drop_rate=drop_rate, seed=i))
        shutil.rmtree(ft)
        files.append(out)
    for i in range(n):
        store.put(f"d{i}", files[i % len(files)])
    return root / "store"


def start(settings: ServerSettings) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    if not _wait_ready(url, thread.is_alive):
        raise RuntimeError("server did not become ready")
    return url, server, thread


def _wait_ready(url: str, alive: Callable[[], bool], timeout_s: float = 600) -> bool:
    """Poll `url`/ready until it answers 200 (True), the server dies or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


def start_process(
    settings: dict[str, Any], threads: int | None, log: Path
) -> tuple[str, subprocess.Popen[bytes]]:
    """`deltaserve serve` in a process of its own (settings as DELTASERVE_* variables); waits until ready."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ) | {f"DELTASERVE_{k.upper()}": str(v) for k, v in settings.items()}
    env |= {"DELTASERVE_HOST": "127.0.0.1", "DELTASERVE_PORT": str(port)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    if _wait_ready(url, lambda: proc.poll() is None):
        return url, proc
    proc.kill()
    raise RuntimeError(f"server did not become ready (log: {log.read_text()[-2000:]})")


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds process `pid` has used (all its threads); None where /proc cannot say."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    url: str,
    models: list[str],
    concurrency: int,
    max_tokens: int,
    seed: int,
    varied: bool = False,
    pid: int | None = None,
) -> dict[str, Any]:
    """Closed loop: `concurrency` clients stream completions for `models` (one request each) until done.
    `varied`: each request's max_tokens is drawn from [max_tokens/4, 7·max_tokens/4]. `pid`: the server's
    process, whose CPU seconds over the run are recorded (work per token, which other tenants' load on a
    shared machine moves far less than wall time)."""
    rng = random.Random(seed)
    low, high = max(1, max_tokens // 4), max(1, 7 * max_tokens // 4)
    jobs = [(m, rng.choice(PROMPTS), rng.randint(low, high) if varied else max_tokens) for m in models]
    lock = threading.Lock()
    results: list[tuple[float, float, int]] = []  # (ttft, latency, tokens)
    client = httpx.Client(base_url=url, timeout=600)

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                model, prompt, limit = jobs.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": limit, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            t0 = time.perf_counter()
            ttft, tokens = None, 0
            with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if ttft is None and event.get("choices") and event["choices"][0].get("text"):
                        ttft = time.perf_counter() - t0
                    if event.get("usage"):
                        tokens = int(event["usage"]["completion_tokens"])
            latency = time.perf_counter() - t0
            with lock:
                results.append((ttft if ttft is not None else latency, latency, tokens))

    before = _metrics(client)
    cpu_before = cpu_seconds(pid)
    client_before = time.process_time()  # this process: the clients (and in-process servers)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - client_before
    cpu_after = cpu_seconds(pid)
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    after = _metrics(client)
    passes = {n: after[n] - before[n] for n in _PASSES}
    out = {"wall_s": wall, "results": results, "swaps": after[_SWAPS] - before[_SWAPS],
           "cache_bytes": after[_CACHE], "server_cpu_s": cpu, "passes": passes,
           "client_cpu_s": client_cpu}  # fmt: skip
    client.close()
    return out


_SWAPS, _CACHE = "deltaserve_swaps_total", "deltaserve_delta_cache_bytes"
# decode steps and rows summed over them, prefills and their rows, and the seconds of each kind of pass
# (the server's counters)
_PASSES = ("deltaserve_decode_steps_total", "deltaserve_decode_rows_total", "deltaserve_prefills_total",
           "deltaserve_prefill_rows_total", "deltaserve_decode_step_seconds_sum",
           "deltaserve_prefill_seconds_sum")  # fmt: skip


def _metrics(client: httpx.Client) -> dict[str, float]:
    """The server counters the benchmark reads (0 where absent), from one scrape of /metrics."""
    names = (_SWAPS, _CACHE, *_PASSES)
    found = dict.fromkeys(names, 0.0)
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found


def _tps(run: dict[str, Any]) -> float:
    return sum(r[2] for r in run["results"]) / run["wall_s"]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    results = [r for run in runs for r in run["results"]]
    ttft = sorted(r[0] for r in results)
    latency = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    wall = sum(run["wall_s"] for run in runs)
    passes = {n: sum(run.get("passes", {}).get(n, 0.0) for run in runs) for n in _PASSES}
    steps, step_rows, prefills, prefill_rows, step_s, prefill_s = (passes[n] for n in _PASSES)
    cpus = [run.get("server_cpu_s") for run in runs]
    cpu = sum(c for c in cpus if c is not None) if cpus and None not in cpus else None

    def p99(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]

    return {
        "requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": p99(ttft),
        "latency_p50_s": statistics.median(latency), "latency_p99_s": p99(latency),
        "swaps_per_request": sum(run["swaps"] for run in runs) / len(results),
        "cache_bytes": max(run["cache_bytes"] for run in runs),
        "server_cpu_s_per_token": cpu / tokens if cpu is not None and tokens else None,
        "server_cores": cpu / wall if cpu is not None else None,
        "client_cores": sum(run.get("client_cpu_s", 0.0) for run in runs) / wall,
        "rows_per_decode_step": step_rows / steps if steps else None,
        "rows_per_prefill": prefill_rows / prefills if prefills else None,
        "decode_step_ms": 1e3 * step_s / steps if steps else None,
        "prefill_ms": 1e3 * prefill_s / prefills if prefills else None,
        "passes_share": (step_s + prefill_s) / wall if steps or prefills else None,
    }  # fmt: skip


def _stop_thread(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(60)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()  # SIGTERM: the server drains (nothing is in flight by now) and exits
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def peak_child_rss_bytes() -> int:
    """The largest peak RSS among this process's waited-for children (the server processes)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, the two target scenarios")
    parser.add_argument("--model", choices=["tiny", "small", "smollm2"], default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--modes", default=None, help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument(
        "--scenarios", default=None, help="e.g. 16:uniform:32,64:zipf:32 (deltas:mix:concurrency)"
    )
    parser.add_argument("--requests", type=int, default=None, help="per configuration (all rounds)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--drop-rate", type=float, default=0.99)
    parser.add_argument(
        "--distinct", type=int, default=8, help="distinct compressed fine-tunes behind the names"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per configuration")
    parser.add_argument(
        "--lengths", choices=["fixed", "varied"], default="fixed", help="max_tokens per request (see above)"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the servers in this process (they share its GIL and OpenMP pools)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.model or "tiny"
    modes = (
        args.modes.split(",")
        if args.modes
        else (["base", "naive", "merged", "auto"] if args.quick else list(MODES))
    )
    if args.scenarios:
        scenarios = [
            Scenario(int(n), mix, int(c)) for n, mix, c in (x.split(":") for x in args.scenarios.split(","))
        ]
    elif args.quick:
        scenarios = [Scenario(16, "uniform", 32), Scenario(64, "zipf", 32)]
    else:
        scenarios = [Scenario(n, mix, c) for n in (1, 4, 16, 64) for mix in ("uniform", "zipf") for c in (1, 8, 32)
                     if not (n == 1 and mix == "zipf")]  # fmt: skip
    requests = args.requests or (96 if args.quick else 128)
    max_tokens = args.max_tokens or (8 if args.quick else 32)
    rounds = args.rounds or 3
    n_max = max(s.deltas for s in scenarios)

    with tempfile.TemporaryDirectory(prefix="deltaserve-bench-") as tmp:
        root = Path(tmp)
        base = base_model(kind, root)
        store = build_store(base, root, n_max, args.distinct, args.drop_rate)
        servers: dict[str, str] = {}
        pids: dict[str, int | None] = {}
        stoppers = []
        for mode in modes:
            fields: dict[str, Any] = dict(
                base=base, store=store, device=args.device, dtype=args.dtype, model_id=BASE_ID,
                max_batch_size=args.max_batch_size, max_queue=4096, log_level="warning", max_wait_ms=50,
                cache_bytes=8 << 30, **MODES[mode],
            )  # fmt: skip
            if args.in_process:
                url, server, thread = start(ServerSettings(**fields))
                stoppers.append(lambda server=server, thread=thread: _stop_thread(server, thread))
                pids[mode] = None  # shares the clients' process: its CPU time is not the server's alone
            else:
                url, proc = start_process(fields, args.threads, root / f"server-{mode}.log")
                stoppers.append(lambda proc=proc: _stop_process(proc))
                pids[mode] = proc.pid
            servers[mode] = url
        raw: dict[tuple[str, Scenario], list[dict[str, Any]]] = {(m, s): [] for m in modes for s in scenarios}
        try:
            for mode, url in servers.items():  # warm-up: load and cache every delta once
                warm = [BASE_ID] * 8 if mode.startswith("base") else [f"d{i}" for i in range(n_max)]
                run(url, warm, 8, 2, 0)
            for r in range(rounds):  # interleaved: machine load drifts over every mode alike
                for scenario in scenarios:
                    for mode, url in servers.items():
                        models = scenario.models(
                            mode, requests // rounds, random.Random(1000 * r + scenario.deltas)
                        )
                        raw[(mode, scenario)].append(
                            run(
                                url,
                                models,
                                scenario.concurrency,
                                max_tokens,
                                seed=r,
                                varied=args.lengths == "varied",
                                pid=pids[mode],
                            )
                        )
        finally:
            for stop in stoppers:
                stop()

    rows = []
    for scenario in scenarios:
        # The base-only workload ignores N and the mix: pool its runs at this concurrency (less noise).
        pooled = [run for (m, sc), runs in raw.items() if m == "base" and sc.concurrency == scenario.concurrency
                  for run in runs]  # fmt: skip
        base_summary = summarize(pooled) if pooled else {}
        base_tps = base_summary.get("tokens_per_s", float("nan"))
        base_cpu = base_summary.get("server_cpu_s_per_token")
        for mode in modes:
            s = {"mode": mode, "deltas": 0 if mode.startswith("base") else scenario.deltas, "mix": scenario.mix,
                 "concurrency": scenario.concurrency, **summarize(raw[(mode, scenario)])}  # fmt: skip
            s["ratio_to_base"] = s["tokens_per_s"] / base_tps
            cpu = s["server_cpu_s_per_token"]
            s["cpu_ratio_to_base"] = base_cpu / cpu if base_cpu is not None and cpu else None
            # Robust to this machine's load swings: per round, over the base run of the same scenario and
            # round (measured next to it in time), then the median over rounds.
            base_runs = raw.get(("base", scenario), [])
            per_round = [_tps(m) / _tps(b) for m, b in zip(raw[(mode, scenario)], base_runs, strict=False)]
            s["ratio_rounds"] = per_round
            s["ratio_median_rounds"] = statistics.median(per_round) if per_round else float("nan")
            rows.append(s)
            print(f"mode={mode} deltas={scenario.deltas} mix={scenario.mix} concurrency={scenario.concurrency} "
                  f"tokens_per_s={s['tokens_per_s']:.1f} ratio_to_base={s['ratio_to_base']:.2f}", flush=True)  # fmt: skip
    meta = {
        "model": kind, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "requests_per_config": requests, "rounds": rounds, "max_tokens": max_tokens, "lengths": args.lengths,
        "max_batch_size": args.max_batch_size, "drop_rate": args.drop_rate, "distinct_finetunes": args.distinct,
        "servers": "in-process" if args.in_process else "processes",
        "peak_rss_bytes": peak_rss_bytes() if args.in_process else peak_child_rss_bytes(), "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / ("serve-quick" if args.quick else "serve")
    write_results(out, {"meta": meta, "results": rows}, render(meta, rows))
    return 0


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# deltaserve serving benchmark ({meta['model']} model, {meta['cuda'] or 'cpu'}, {meta['threads']} threads)",
        "",
        f"{meta['requests_per_config']} streamed requests per configuration in {meta['rounds']} interleaved rounds, "
        f"{meta['max_tokens']} tokens each ({'drawn from [max/4, 7·max/4], ' if meta.get('lengths') == 'varied' else ''}"
        f"greedy, ignore_eos), max batch {meta['max_batch_size']}; DARE deltas at "
        f"drop rate {meta['drop_rate']} ({meta['distinct_finetunes']} distinct fine-tunes behind the names). "
        "`ratio` = tokens/s over the base-only server at the same concurrency (its runs pooled over the "
        "scenarios: the base workload does not depend on N or the mix; `base` uses continuous batching, as every "
        "mode but the `-static` ones does). `median/round` = the median over rounds of tokens/s over the base "
        "run of the same scenario and round, measured next to it (robust to the machine's load swings); "
        "`rounds` lists them. `CPU ratio` = server CPU seconds per token of the base-only server over this "
        "server's (pooled like `ratio`; the work a token costs, which other tenants' load moves far less than "
        "wall time; servers in processes only). `rows/step` = the mean batch a decode step served, `rows/prefill` "
        "the mean rows a prefill (a batch's start, or rows joining it) served; `ms/step` and `ms/prefill` the "
        "server's mean time for each (forward pass and token choice), `in passes` the share of the wall time "
        "the server spent in them (the rest: the HTTP layer, scheduling, joins, and waiting on clients). "
        "`swaps/req` counts a delta swap's apply "
        "and restore separately, the naive server's full copy once. "
        + (
            f"Peak RSS of the whole run (all servers in one process): {meta['peak_rss_bytes'] / 2**20:.0f} MiB."
            if meta.get("servers") != "processes"
            else "Each server is its own `deltaserve serve` process, the clients are in the benchmark's; peak "
            f"RSS of the largest server process: {meta['peak_rss_bytes'] / 2**20:.0f} MiB."
        ),
        "",
        "| mode | deltas | mix | conc. | tokens/s | ratio | median/round | rounds | CPU ratio | rows/step | rows/prefill | ms/step | ms/prefill | in passes | cores | TTFT p50 / p99 (s) | latency p50 / p99 (s) | swaps/req | cache MiB |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['deltas']} | {r['mix']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
            f"{r['ratio_to_base']:.2f} | {r.get('ratio_median_rounds', float('nan')):.2f} | "
            f"{' '.join(f'{x:.2f}' for x in r.get('ratio_rounds', []))} | "
            f"{'-' if r.get('cpu_ratio_to_base') is None else format(r['cpu_ratio_to_base'], '.2f')} | "
            f"{'-' if r.get('rows_per_decode_step') is None else format(r['rows_per_decode_step'], '.1f')} | "
            f"{'-' if r.get('rows_per_prefill') is None else format(r['rows_per_prefill'], '.1f')} | "
            f"{'-' if r.get('decode_step_ms') is None else format(r['decode_step_ms'], '.1f')} | "
            f"{'-' if r.get('prefill_ms') is None else format(r['prefill_ms'], '.1f')} | "
            f"{'-' if r.get('passes_share') is None else format(r['passes_share'], '.0%')} | "
            f"{'-' if r.get('server_cores') is None else format(r['server_cores'], '.2f')} | "
            f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | "
            f"{r['latency_p50_s']:.3f} / {r['latency_p99_s']:.3f} | {r['swaps_per_request']:.2f} | "
            f"{r['cache_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
