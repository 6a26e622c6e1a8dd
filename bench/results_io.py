"""Writing a benchmark's results: raw JSON and its markdown table side by side in bench/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, payload: dict[str, Any], markdown: str) -> None:
    """`out`.json (the raw figures) and `out`.md (the table), and the table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
