"""Benchmarks: measurements, never asserted in tests (run from the repository root: ``python -m benchmarks.X``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_outputs(output: str | Path, res: dict[str, Any], markdown: str) -> Path:
    """A benchmark's ``results.json`` (``res``) and ``results.md`` (``markdown``) in ``output``; prints the table."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    print(markdown, end="")
    return out
