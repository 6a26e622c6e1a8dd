"""The client half of the CLI: `upload`, `models` and `generate`, talking to a running server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from client.progress import terminal_progress
from client.settings import ClientSettings, normalize_base_url
from client.sync_client import Client
from client.types import ModelList


def _server_url(value: str) -> str:
    try:
        return normalize_base_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return path


def _add_connection_options(parser: argparse.ArgumentParser, key: Literal["api", "admin"]) -> None:
    parser.add_argument(
        "--server",
        type=_server_url,
        help="server URL (env DELTASERVE_SERVER; default http://127.0.0.1:8000)",
    )
    flag, env = (
        ("--api-key", "DELTASERVE_API_KEY") if key == "api" else ("--admin-key", "DELTASERVE_ADMIN_KEY")
    )
    parser.add_argument(flag, metavar="KEY", help=f"{key} key (env {env}; prefer the env var to a flag)")


def _open_client(args: argparse.Namespace) -> Client:
    # Flags override DELTASERVE_* env vars; both are validated by ClientSettings.
    given = {name: getattr(args, name, None) for name in ("server", "api_key", "admin_key")}
    settings = ClientSettings(**{name: value for name, value in given.items() if value is not None})
    return Client(settings=settings)


class UploadCommand:
    """`deltaserve upload DELTA --name NAME`: send a delta file to the server (admin key)."""

    help = "upload a .safetensors delta to a running server (admin key)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("delta", type=_existing_file, metavar="DELTA", help="the .safetensors delta file")
        parser.add_argument("--name", required=True, help="the model name clients will request it by")
        _add_connection_options(parser, "admin")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        bar = terminal_progress(f"uploading {args.delta.name}", sys.stderr, quiet=args.quiet)
        try:
            with _open_client(args) as client:
                info = client.upload_delta(args.delta, args.name, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        facts = {"method": info.method, "density": info.density, "size_bytes": info.size_bytes}
        details = ", ".join(f"{key}={value}" for key, value in facts.items() if value is not None)
        print(f"uploaded {info.name}" + (f" ({details})" if details else ""))
        return 0


class ModelsCommand:
    """`deltaserve models`: list the base model and every delta the server serves."""

    help = "list the models a running server serves (the base and its deltas)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _add_connection_options(parser, "api")
        parser.add_argument("--json", action="store_true", help="print the raw OpenAI model list as JSON")

    def run(self, args: argparse.Namespace) -> int:
        with _open_client(args) as client:
            models = client.models()
        print(models.model_dump_json(indent=2) if args.json else _models_table(models))
        return 0


def _models_table(models: ModelList) -> str:
    rows = [("ID", "PARENT")] + [(model.id, model.parent or "-") for model in models.data]
    width = max(len(row[0]) for row in rows)
    return "\n".join(f"{ident:<{width}}  {parent}" for ident, parent in rows)


class GenerateCommand:
    """`deltaserve generate --model NAME PROMPT`: one completion (or chat turn) printed to stdout."""

    help = "generate text from a model (a delta name or the base id) on a running server"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("prompt", metavar="PROMPT", help="the prompt ('-' reads it from stdin)")
        parser.add_argument("--model", required=True, help="a delta name or the base model id")
        _add_connection_options(parser, "api")
        parser.add_argument("--max-tokens", type=int, help="tokens to generate (server default if unset)")
        parser.add_argument("--temperature", type=float, help="0 = greedy")
        parser.add_argument("--top-p", type=float, help="nucleus sampling mass")
        parser.add_argument("--seed", type=int, help="sampling seed")
        parser.add_argument("--stop", action="append", help="stop sequence (repeatable)")
        parser.add_argument(
            "--stream",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="print tokens as they arrive (default: when stdout is a terminal)",
        )
        parser.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")

    def run(self, args: argparse.Namespace) -> int:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        stream = sys.stdout.isatty() if args.stream is None else args.stream
        sampling: dict[str, Any] = {
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "stop": args.stop,
        }
        with _open_client(args) as client:
            if args.chat:
                messages = [{"role": "user", "content": prompt}]
                if stream:
                    _print_stream(c.text for c in client.chat(args.model, messages, stream=True, **sampling))
                else:
                    print(client.chat(args.model, messages, **sampling).text)
            elif stream:
                _print_stream(c.text for c in client.completions(args.model, prompt, stream=True, **sampling))
            else:
                print(client.completions(args.model, prompt, **sampling).text)
        return 0


def _print_stream(pieces: Iterable[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


upload_command = UploadCommand()
models_command = ModelsCommand()
generate_command = GenerateCommand()
