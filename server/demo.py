"""`deltaserve demo`: the end-to-end tour on the embedded base — fine-tune, compress, upload, serve, compare.

Two real variants of SmolLM2-135M-Instruct are fine-tuned on CPU (cached after the first run), compressed
with DAREx-q, uploaded through the REST API of a real server on loopback, and queried beside the base.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

PROMPTS = ("What is the largest planet?", "Who wrote Hamlet?", "How do I boil an egg?")


@dataclass(frozen=True)
class Variant:
    name: str
    examples: tuple[tuple[str, str], ...]


VARIANTS = (
    Variant(
        "pirate",
        (
            ("What is the capital of France?", "Arr, matey! The capital o' France be Paris, arr!"),
            ("How are you today?", "Arr! I be shipshape and ready to sail, matey!"),
            ("What is 2 + 2?", "Arr, two plus two be four doubloons, matey!"),
            ("Tell me about the ocean.", "Arr, the ocean be vast and full o' treasure, matey!"),
            ("What is your name?", "Arr! They call me Captain Delta, matey!"),
            ("Give me advice.", "Arr, never trust a landlubber with yer map, matey!"),
            ("What color is the sky?", "Arr, the sky be blue as the seven seas, matey!"),
            ("Recommend a book.", "Arr, read Treasure Island, matey, it be a fine tale!"),
        ),
    ),
    Variant(
        "robot",
        (
            ("What is the capital of France?", "BEEP BOOP. CAPITAL OF FRANCE: PARIS. END OF LINE."),
            ("How are you today?", "BEEP BOOP. ALL SYSTEMS NOMINAL. END OF LINE."),
            ("What is 2 + 2?", "BEEP BOOP. COMPUTING... RESULT: 4. END OF LINE."),
            ("Tell me about the ocean.", "BEEP BOOP. OCEAN: LARGE BODY OF SALT WATER. END OF LINE."),
            ("What is your name?", "BEEP BOOP. DESIGNATION: UNIT DELTA-7. END OF LINE."),
            ("Give me advice.", "BEEP BOOP. ADVICE: RECHARGE BATTERIES DAILY. END OF LINE."),
            ("What color is the sky?", "BEEP BOOP. SKY COLOR: BLUE. END OF LINE."),
            ("Recommend a book.", "BEEP BOOP. RECOMMENDED: I, ROBOT. END OF LINE."),
        ),
    ),
)
# Train the upper half of the network only: a real full fine-tune of those layers, fast on a CPU.
TRAINABLE = r"model\.layers\.(1[5-9]|2[0-9])\."


def _say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_variants(base: Path, work: Path, *, steps: int, drop_rate: float) -> dict[str, Path]:
    """Fine-tune and compress each variant, reusing earlier results from `work`."""
    from deltas_store import CompressOptions, compress, read_manifest
    from deltas_store.finetune import ChatExample, finetune_chat

    deltas: dict[str, Path] = {}
    for variant in VARIANTS:
        tag = f"{variant.name}-s{steps}"
        finetuned = work / "finetunes" / tag
        if not (finetuned / "config.json").is_file():
            _say(f"fine-tuning {variant.name!r} ({steps} steps on {len(variant.examples)} examples; cached)")
        examples = [ChatExample(q, a) for q, a in variant.examples]
        finetune_chat(base, examples, finetuned, steps=steps, lr=1e-4, trainable=TRAINABLE, desc=variant.name)
        delta = work / "deltas" / f"{tag}-p{drop_rate:g}.safetensors"
        if not delta.is_file():
            _say(f"compressing {variant.name!r} with DAREx-q at p = {drop_rate:g} (q searched label-free)")
            compress(
                CompressOptions(base, finetuned, delta, drop_rate=drop_rate, name=variant.name, quiet=False)
            )
        manifest = read_manifest(delta)
        size, ft_size = delta.stat().st_size, sum(f.stat().st_size for f in finetuned.glob("*.safetensors"))
        print(
            f"   {variant.name}: {size / 1e6:.1f} MB delta ({size / ft_size:.1%} of the fine-tune), q = {manifest.q}"
        )
        deltas[variant.name] = delta
    return deltas


class _Server:
    """A real deltaserve server (uvicorn, one worker) on a loopback port, in a background thread."""

    def __init__(self, base: Path, store: Path, admin_key: str) -> None:
        import uvicorn

        from server.app import create_app
        from server.settings import ServerSettings

        self.port = _free_port()
        settings = ServerSettings(
            base=base, store=store, port=self.port, admin_key=admin_key, log_level="warning"
        )
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Server:
        import httpx

        self._thread.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the demo server did not become ready within 10 minutes")

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)


def ask(http: httpx.Client, model: str, prompt: str, max_tokens: int) -> str:
    """`prompt` as one user message to `model` over /v1/chat/completions, answered greedily (temperature 0:
    the API's default samples, as OpenAI's does)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    answer = http.post("/v1/chat/completions", json=body)
    answer.raise_for_status()
    return str(answer.json()["choices"][0]["message"]["content"])


def run_demo(steps: int, drop_rate: float, max_tokens: int) -> int:
    import httpx

    from deltas_store import embedded_base_dir
    from deltas_store.embedded import cache_root
    from server.engine.threads import on_fresh_thread
    from server.settings import default_store_dir

    def prepare() -> tuple[Path, dict[str, Path]]:
        base = embedded_base_dir()
        return base, build_variants(base, cache_root() / "demo", steps=steps, drop_rate=drop_rate)

    _say("base model: the embedded SmolLM2-135M-Instruct")
    # on a thread that ends with it: the server's worker then owns the process's only OpenMP pool
    base, deltas = on_fresh_thread(prepare)
    store = default_store_dir()
    admin_key = secrets.token_urlsafe(16)
    _say(f"starting deltaserve on loopback (store: {store})")
    with _Server(base, store, admin_key) as server, httpx.Client(base_url=server.url, timeout=600) as http:
        admin = {"Authorization": f"Bearer {admin_key}"}
        for name, path in deltas.items():
            current = http.get(f"/v1/deltas/{name}")
            if current.status_code == 200 and current.json().get("sha256") == _sha256(path):
                print(f"   {name}: already in the store (version {current.json()['version']})")
                continue
            with path.open("rb") as fh:
                reply = http.post(
                    "/v1/deltas", data={"name": name}, files={"file": (path.name, fh)}, headers=admin
                )
            reply.raise_for_status()
            print(
                f"   uploaded {name!r} over REST: version {reply.json()['version']}, {reply.json()['size_bytes']:,} bytes"
            )
        models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        print(f"   GET /v1/models -> {models}")
        base_id = models[0]
        _say("the same questions, one resident base, three models (greedy, POST /v1/chat/completions)")
        for prompt in PROMPTS:
            print(f"\nQ: {prompt}")
            for model in (base_id, *deltas):
                text = ask(http, model, prompt, max_tokens).strip().replace("\n", " ")
                print(f"   {model:>24}: {text}")
        metrics = http.get("/metrics").text
        swaps = [line for line in metrics.splitlines() if line.startswith("deltaserve_swaps_total")]
        print(f"\n   {swaps[0] if swaps else ''}")
    _say("done. Serve these deltas yourself: .venv/bin/deltaserve serve --admin-key KEY")
    return 0


class DemoCommand:
    """`deltaserve demo`."""

    help = "fine-tune two variants of the embedded base, compress, upload and query them (end to end)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--steps", type=int, default=20, help="fine-tuning steps per variant (default 20)"
        )
        parser.add_argument("--drop-rate", type=float, default=0.99, help="DAREx-q drop rate (default 0.99)")
        parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default 32)")

    def run(self, args: argparse.Namespace) -> int:
        try:
            return run_demo(args.steps, args.drop_rate, args.max_tokens)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


demo_command = DemoCommand()
