"""The README stays true: its first commands, CI calling its test command, every setting documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_first_lines_give_the_two_newcomer_commands() -> None:
    head = "\n".join(README.splitlines()[:8])
    assert re.search(r"^make demo\b", head, re.M) and re.search(r"^make test\b", head, re.M)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_make_install_puts_the_cli_in_the_venv() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "VENV ?= .venv" in makefile and re.search(r"^test: install", makefile, re.M)
    assert re.search(r"^demo: install", makefile, re.M)


def _settings_classes() -> list[type]:
    from client.settings import ClientSettings
    from deltas_store.settings import CompressSettings
    from server.settings import ServerSettings

    return [ServerSettings, ClientSettings, CompressSettings]


@pytest.mark.parametrize("cls", _settings_classes(), ids=lambda c: c.__name__)
def test_every_setting_is_in_the_configuration_table(cls: type) -> None:
    documented = set(re.findall(r"`(DELTASERVE_[A-Z0-9_]+)`", README))
    fields = {f"DELTASERVE_{name.upper()}" for name in cls.model_fields}  # type: ignore[attr-defined]
    assert fields <= documented, sorted(fields - documented)
