"""The CLI subcommand protocol, and discovery of the plug-in subcommands through entry points."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

ENTRY_POINT_GROUP = "deltaserve.commands"

# The extra that brings each first-party plug-in package's dependencies, for the install hint.
_EXTRAS = {"deltas_store": "store", "server": "server"}


class Command(Protocol):
    """One `deltaserve` subcommand: built-in (upload, models, generate) or a plug-in (compress, serve, ...).

    Plug-ins are objects named by entry points in the `deltaserve.commands` group. Loading one must stay
    cheap: heavy imports (torch, transformers) belong inside `run`.

    Example:
        >>> class Hello:
        ...     help = "say hello"
        ...     def add_arguments(self, parser): parser.add_argument("--to", default="world")
        ...     def run(self, args): print(f"hello {args.to}"); return 0
    """

    @property
    def help(self) -> str:
        """One line for `deltaserve --help`."""
        ...

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the subcommand's arguments on its own subparser."""

    def run(self, args: argparse.Namespace) -> int:
        """Do the work; return the exit code (0 ok, 1 failure)."""
        ...


def _is_first_party(module: str) -> bool:
    return module.partition(".")[0] in (*_EXTRAS, "client")


def install_hint(module: str) -> str | None:
    """`pip install 'deltaserve[extra]'` for a first-party plug-in module, None for anyone else's."""
    extra = _EXTRAS.get(module.partition(".")[0])
    return f"pip install 'deltaserve[{extra}]'" if extra else None


@dataclass(frozen=True)
class UnavailableCommand:
    """Stands in for a plug-in that cannot load in this install; running it says what to install."""

    name: str
    reason: str
    hint: str | None = None

    @property
    def help(self) -> str:
        return f"(unavailable: {self.hint or self.reason})"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        # Swallow whatever was typed (cli.main lets unknown options through for this command too), so
        # the user gets the install hint, not a usage error.
        parser.add_argument("ignored", nargs="*", help=argparse.SUPPRESS)

    def run(self, args: argparse.Namespace) -> int:
        hint = f"; install it with: {self.hint}" if self.hint else ""
        print(f"error: 'deltaserve {self.name}' is not available here: {self.reason}{hint}", file=sys.stderr)
        return 1


@dataclass(frozen=True)
class PluginCommand:
    """A loaded plug-in; a dependency missing at run time becomes the install hint, not a traceback."""

    name: str
    command: Command
    module: str

    @property
    def help(self) -> str:
        return self.command.help

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        self.command.add_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        try:
            return self.command.run(args)
        except ModuleNotFoundError as exc:
            hint = install_hint(self.module)
            missing = exc.name or ""
            # Only a missing third-party package of a first-party plug-in is an install problem.
            if hint is None or not missing or _is_first_party(missing):
                raise
            top = missing.partition(".")[0]
            return UnavailableCommand(self.name, f"{top} is not installed", hint).run(args)


def load_plugins(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> dict[str, Command]:
    """Every `deltaserve.commands` entry point, loaded (cheap by contract) or marked unavailable."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points
    commands: dict[str, Command] = {}
    for entry_point in found:
        commands[entry_point.name] = _load(entry_point)
    return commands


def _load(entry_point: importlib.metadata.EntryPoint) -> Command:
    name, module = entry_point.name, entry_point.module
    try:
        loaded = entry_point.load()
    except ImportError as exc:
        missing = exc.name or module
        # A missing third-party package is an install choice; a missing first-party module is a bug.
        hint = None if _is_first_party(missing) else install_hint(module)
        return UnavailableCommand(name, f"cannot import {missing}", hint)
    except AttributeError as exc:  # the module imports but does not define the named object
        return UnavailableCommand(name, f"broken plug-in {entry_point.value}: {exc}")
    if not all(callable(getattr(loaded, attr, None)) for attr in ("add_arguments", "run")):
        return UnavailableCommand(name, f"{entry_point.value} is not a deltaserve command")
    return PluginCommand(name, loaded, module)
