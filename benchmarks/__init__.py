"""Benchmarks: measurements, never asserted in tests (run from the repository root: ``python -m benchmarks.X``)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
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


def pin_cpus(n: int) -> list[int]:
    """Confine this process, and the processes it starts, to ``n`` of the CPUs it may use (all of them where it
    may use no more); the CPUs, in order. A peer whose runtime starts threads of its own (XLA) then gets no more
    cores than a torch path held to ``n`` threads."""
    cpus = sorted(os.sched_getaffinity(0))
    if n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])
    return sorted(os.sched_getaffinity(0))


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type``: comma-separated names, each one of ``choices`` (at least one)."""

    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(unknown) or 'none given'}; choose from "
                                             f"{', '.join(choices)}")
        return names

    return parse
