"""Command-line plumbing shared by the experiment modules (argparse lives only here and in ``__main__``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pyro_lvm.guides.registry import parse_guide_spec

from pyro_lvm.registry import UnknownNameError
from pyro_lvm.report import results_table
from pyro_lvm.train import TrainConfig, TrainingError

#: errors that are the user's to fix: reported in one line, exit status 2, no traceback
USER_ERRORS = (ValueError, FileNotFoundError, UnknownNameError, TrainingError)


def guide_list(text: str) -> list[str]:
    """argparse type: a comma-separated list of guide specs, each checked against the registry."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise argparse.ArgumentTypeError("give at least one guide name")
    for s in specs:
        try:
            parse_guide_spec(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return specs


def int_tuple(text: str) -> tuple[int, ...]:
    """argparse type: ``"300,300"`` -> (300, 300); ``""`` -> () (a linear network)."""
    try:
        out = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"layer sizes must be >= 1, got {text!r}")
    return out


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def add_common_args(p: argparse.ArgumentParser, *, default_output: str) -> None:
    p.add_argument("--seed", type=int, default=0, help="one seed fixes data split, initialisation and sampling")
    p.add_argument("--output", default=default_output, help="directory for results.json, results.md, figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables on stdout")


def add_full_batch_train_args(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """``--epochs``, ``--lr``, ``--batch-size`` (default: full batch) and ``--num-particles``."""
    p.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: full batch")
    p.add_argument("--num-particles", type=positive_int, default=defaults.num_particles)


def train_from_args(defaults: TrainConfig, a: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """``defaults`` with the flags of :func:`add_full_batch_train_args` (and ``overrides``) applied."""
    return dataclasses.replace(defaults, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                               num_particles=a.num_particles, **overrides)


def experiment_main(parse_args: Callable[[Sequence[str] | None], Any],
                    run: Callable[[Any], dict[str, Any]]) -> Callable[[Sequence[str] | None], int]:
    """An experiment's ``main(argv)``: parse flags into its config, run it, print the table unless quiet."""

    def main(argv: Sequence[str] | None = None) -> int:
        cfg = parse_args(argv)
        payload = run(cfg)
        if not cfg.quiet:
            print(results_table(payload))
            print(f"results written to {cfg.output}/results.json")
        return 0

    return main


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run an experiment's ``main``; user errors become one line on stderr and exit status 2."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        first, *rest = str(e).splitlines() or [type(e).__name__]
        print(f"error: {first}", file=sys.stderr)
        for line in rest:
            print(f"  {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
