"""`deltaserve serve`: the server half of the CLI, loaded lazily by the client's entry point (no torch on import)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.settings import ServerSettings

_OPTIONAL = (  # flag, settings field, type, help
    ("--host", "host", str, "interface to bind (default 127.0.0.1)"),
    ("--port", "port", int, "port (default 8000)"),
    ("--api-key", "api_key", str, "key required on inference routes (default: none)"),
    ("--admin-key", "admin_key", str, "key required on admin routes (default: admin routes disabled)"),
    ("--model-id", "model_id", str, "id to serve the base under (default: its name)"),
    ("--max-batch-size", "max_batch_size", int, "requests per batch (default 8)"),
    ("--max-queue", "max_queue", int, "queued requests before 429 (default 256)"),
    ("--max-wait-ms", "max_wait_ms", float, "longest a model waits behind another (default 200)"),
    ("--cache-bytes", "cache_bytes", int, "memory budget for prepared deltas (default 2 GiB)"),
    ("--batch-mode", "batch_mode", str, "auto|merged|mixed: one delta per batch or many (default auto)"),
    ("--max-upload-bytes", "max_upload_bytes", int, "largest accepted delta upload (default 8 GiB)"),
    ("--log-level", "log_level", str, "critical|error|warning|info|debug (default info)"),
)


class ServeCommand:
    """Serve the base model and every delta in the store through an OpenAI-compatible API."""

    name = "serve"
    help = "serve the base model and every stored delta (OpenAI-compatible API)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        # Defaults are None so that DELTASERVE_* environment variables apply when a flag is not given.
        parser.add_argument(
            "--base", type=Path, default=None, help="Hugging Face model directory (default: embedded SmolLM2)"
        )
        parser.add_argument(
            "--store",
            type=Path,
            default=None,
            help="delta store directory (default: ~/.local/share/deltaserve/store)",
        )
        parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default auto")
        parser.add_argument(
            "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None, help="default auto"
        )
        for flag, field, type_, help_ in _OPTIONAL:
            parser.add_argument(flag, dest=field, type=type_, default=None, help=help_)

    def run(self, args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        from server.settings import ServerSettings

        given = {k: v for k, v in vars(args).items() if v is not None and k in ServerSettings.model_fields}
        try:
            settings = ServerSettings(**given)
        except ValidationError as exc:
            for error in exc.errors():
                where = ".".join(str(p) for p in error["loc"])
                print(f"deltaserve serve: {where}: {error['msg']} (flag --{where.replace('_', '-')} "
                      f"or DELTASERVE_{where.upper()})", file=sys.stderr)  # fmt: skip
            return 2
        return serve(settings)


def serve(settings: ServerSettings) -> int:
    """Run one uvicorn worker until SIGINT/SIGTERM, draining in-flight requests on the way out."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    base = settings.base
    if base is None:  # the embedded default: converted once, with a progress message
        from deltas_store import DeltaStoreError, embedded_base_dir

        try:
            base = embedded_base_dir()
        except DeltaStoreError as exc:
            print(f"deltaserve serve: {exc}", file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"base": base})
    if not (base / "config.json").is_file():  # fail fast, before the heavy imports
        print(
            f"deltaserve serve: {base}: not a Hugging Face model directory (no config.json)",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from deltas_store import DeltaStore, DeltaStoreError, ModelDir
    from server.app import create_app

    try:  # the other common mistakes, before a port is bound
        ModelDir.open(base).close()
        DeltaStore(settings.store)
    except (DeltaStoreError, OSError) as exc:
        print(f"deltaserve serve: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
    )
    uvicorn.Server(config).run()  # handles SIGTERM/SIGINT: stop accepting, finish in-flight, then lifespan
    return 0


serve_command = ServeCommand()
