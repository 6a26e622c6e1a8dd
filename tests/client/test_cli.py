"""The `deltaserve` CLI: argument parsing, exit codes, and plug-in loading that never crashes the client."""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass, field
from typing import Any

import pytest

from client import cli
from client.commands import UnavailableCommand, install_hint, load_plugins
from client.progress import terminal_progress
from client.remote_commands import generate_command

UNREACHABLE = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused at once


@pytest.fixture(autouse=True)
def no_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI tests see only the client's own commands unless a test installs fake plug-ins."""
    monkeypatch.setattr(cli, "load_plugins", lambda: {})


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser(cli.CLIENT_COMMANDS).parse_args(argv)


def test_generate_arguments() -> None:
    args = parse("generate", "--model", "bot", "Hello there", "--max-tokens", "8", "--temperature", "0",
                 "--no-stream", "--chat", "--stop", "\n", "--stop", "###", "--server", "http://h:1/")  # fmt: skip
    assert (args.model, args.prompt, args.max_tokens, args.temperature) == ("bot", "Hello there", 8, 0.0)
    assert (args.stream, args.chat, args.stop, args.server) == (False, True, ["\n", "###"], "http://h:1")
    assert parse("generate", "--model", "m", "p").stream is None  # decided by whether stdout is a TTY
    assert parse("generate", "--model", "m", "p", "--stream").stream is True


def test_upload_and_models_arguments(tmp_path: Any) -> None:
    delta = tmp_path / "d.safetensors"
    delta.write_bytes(b"x")
    args = parse("upload", str(delta), "--name", "d", "--admin-key", "k", "-q")
    assert (args.delta, args.name, args.admin_key, args.quiet) == (delta, "d", "k", True)
    args = parse("models", "--api-key", "k", "--json")
    assert (args.api_key, args.json, args.server) == ("k", True, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["generate", "hello"], "--model"),
        (["upload", "missing.safetensors", "--name", "x"], "no such file"),
        (["models", "--server", "localhost:8000"], "server URL must look like"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("upload", "models", "generate"))


def test_models_against_an_unreachable_server_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DELTASERVE_MAX_RETRIES", "0")
    assert cli.main(["models", "--server", UNREACHABLE]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: could not talk to {UNREACHABLE}")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_server_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DELTASERVE_SERVER", UNREACHABLE)
    monkeypatch.setenv("DELTASERVE_MAX_RETRIES", "0")
    assert cli.main(["generate", "--model", "m", "hi", "--no-stream"]) == 1
    assert UNREACHABLE in capsys.readouterr().err


def test_invalid_environment_setting_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DELTASERVE_TIMEOUT", "soon")
    assert cli.main(["models"]) == 2
    assert "error: invalid setting: timeout" in capsys.readouterr().err


# --- plug-ins ------------------------------------------------------------------------------------


@dataclass
class FakeCommand:
    help: str = "a fake plug-in"
    runs: list[argparse.Namespace] = field(default_factory=list)
    raises: BaseException | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--level", type=int, default=1)

    def run(self, args: argparse.Namespace) -> int:
        self.runs.append(args)
        if self.raises is not None:
            raise self.raises
        return 0


@dataclass
class FakeEntryPoint:
    """Duck-types importlib.metadata.EntryPoint: name, value, module, load()."""

    name: str
    value: str
    loaded: Any = None
    error: BaseException | None = None

    @property
    def module(self) -> str:
        return self.value.partition(":")[0]

    def load(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.loaded


def install_plugins(monkeypatch: pytest.MonkeyPatch, *entry_points: FakeEntryPoint) -> None:
    monkeypatch.setattr(cli, "load_plugins", lambda: load_plugins(entry_points))  # type: ignore[arg-type]


def test_plugins_get_their_arguments_and_run(monkeypatch: pytest.MonkeyPatch) -> None:
    compress = FakeCommand()
    install_plugins(monkeypatch, FakeEntryPoint("compress", "deltas_store.cli:compress_command", compress))
    assert cli.main(["compress", "--level", "3"]) == 0
    assert compress.runs[0].level == 3


def test_a_plugin_missing_its_dependencies_is_shown_unavailable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing_torch = ModuleNotFoundError("No module named 'torch'", name="torch")
    install_plugins(monkeypatch, FakeEntryPoint("serve", "server.cli:serve_command", error=missing_torch))
    assert cli.main(["--help"]) == 0
    assert "(unavailable: pip install 'deltaserve[server]')" in capsys.readouterr().out
    assert cli.main(["serve", "--base", "x", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "'deltaserve serve' is not available here: cannot import torch" in err
    assert "pip install 'deltaserve[server]'" in err
    assert cli.main(["models", "--help"]) == 0  # the client commands still work


def test_a_dependency_missing_at_run_time_gets_the_same_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lazy = FakeCommand(raises=ModuleNotFoundError("No module named 'torch.nn'", name="torch.nn"))
    install_plugins(monkeypatch, FakeEntryPoint("compress", "deltas_store.cli:compress_command", lazy))
    assert cli.main(["compress"]) == 1
    assert (
        "torch is not installed; install it with: pip install 'deltaserve[store]'" in capsys.readouterr().err
    )


def test_a_bug_in_a_first_party_plugin_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    buggy = FakeCommand(
        raises=ModuleNotFoundError("No module named 'deltas_store.gone'", name="deltas_store.gone")
    )
    install_plugins(monkeypatch, FakeEntryPoint("compress", "deltas_store.cli:compress_command", buggy))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["compress"])


def test_broken_plugins_do_not_break_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_plugins(
        monkeypatch,
        FakeEntryPoint(
            "inspect", "deltas_store.cli:inspect_command", error=AttributeError("no inspect_command")
        ),
        FakeEntryPoint("verify", "thirdparty.cli:verify", loaded=object()),
        FakeEntryPoint("models", "thirdparty.cli:models", loaded=FakeCommand(help="shadow")),
    )
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "broken plug-in" in out and "is not a deltaserve command" in out and "shadow" not in out
    commands = cli.available_commands()
    assert isinstance(commands["inspect"], UnavailableCommand)
    assert commands["models"] is cli.CLIENT_COMMANDS["models"]  # a plug-in never shadows a built-in


def test_install_hints() -> None:
    assert install_hint("deltas_store.cli") == "pip install 'deltaserve[store]'"
    assert install_hint("server.cli") == "pip install 'deltaserve[server]'"
    assert install_hint("someone_else.cli") is None


def test_client_commands_follow_the_protocol() -> None:
    for command in cli.CLIENT_COMMANDS.values():
        assert isinstance(command.help, str) and callable(command.add_arguments) and callable(command.run)
    assert cli.CLIENT_COMMANDS["generate"] is generate_command


# --- progress ------------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_not_quiet() -> None:
    assert terminal_progress("up", io.StringIO(), quiet=False) is None
    assert terminal_progress("up", FakeTerminal(), quiet=True) is None
    terminal = FakeTerminal()
    bar = terminal_progress("up", terminal, quiet=False)
    assert bar is not None
    for done in (0, 10, 10, 50, 100):
        bar(done, 100)
    bar.close()
    lines = terminal.getvalue().split("\r")[1:]
    assert len(lines) == 4  # one redraw per shown percent, not per call
    assert lines[-1].startswith("up [##############################] 100%") and lines[-1].endswith("\n")
