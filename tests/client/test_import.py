"""The client installs and imports without torch: importing it (or running a client subcommand) loads none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "safetensors", "transformers", "numpy", "deltas_store", "server")


def imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    )
    loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def test_import_client_does_not_import_torch() -> None:
    assert imported_after("import client") == []


@pytest.mark.parametrize("argv", [["models", "--help"], ["--help"]])
def test_building_the_cli_with_plugins_does_not_import_torch(argv: list[str]) -> None:
    # The real entry points (when the distribution is installed) are loaded here: they must stay cheap.
    heavy = imported_after(f"from client.cli import main\nmain({argv!r})")
    assert "torch" not in heavy and "transformers" not in heavy and "safetensors" not in heavy
