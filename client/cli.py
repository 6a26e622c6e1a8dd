"""The `deltaserve` console script: client subcommands built in, the others as lazily loaded plug-ins."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from pydantic import ValidationError

from client.commands import Command, UnavailableCommand, load_plugins
from client.errors import DeltaserveError
from client.remote_commands import generate_command, models_command, upload_command

# The subcommands this package implements itself; they never import torch.
CLIENT_COMMANDS: dict[str, Command] = {
    "upload": upload_command,
    "models": models_command,
    "generate": generate_command,
}


def available_commands() -> dict[str, Command]:
    """The plug-ins found through entry points (loaded, or marked unavailable), then the client's own."""
    plugins = {name: cmd for name, cmd in load_plugins().items() if name not in CLIENT_COMMANDS}
    return {**plugins, **CLIENT_COMMANDS}


def build_parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    """One subparser per command, each declaring its own arguments."""
    parser = argparse.ArgumentParser(
        prog="deltaserve",
        description="Compress fine-tunes into sparse deltas and serve them all from one base model.",
    )
    subparsers = parser.add_subparsers(dest="_command", metavar="COMMAND", required=True)
    for name, command in commands.items():
        subparser = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns 0 ok, 1 server/API (or command) failure, 2 usage error."""
    commands = available_commands()
    parser = build_parser(commands)
    try:
        args, unknown = parser.parse_known_args(argv)
        # An unavailable plug-in takes any arguments, so that the user sees the install hint instead.
        if unknown and not isinstance(commands[args._command], UnavailableCommand):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return commands[args._command].run(args)
    except DeltaserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:  # a DELTASERVE_* setting (or flag) that does not parse
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"error: invalid setting: {problems}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
