"""``pyro-lvm <experiment> [flags]``: one console script for every experiment; ``pyro-lvm --help`` lists
the experiments, models, guides and data sets."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from . import STANDALONE


def _standalone(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def overview() -> str:
    from pyro_lvm.data import dataset_entry, dataset_names
    from pyro_lvm.guides import GUIDES
    from pyro_lvm.harness import EXPERIMENTS
    from pyro_lvm.models import MODELS

    from . import load_all

    load_all()

    lines = ["usage: pyro-lvm EXPERIMENT [flags]   (pyro-lvm EXPERIMENT --help for its flags)", "", "experiments:"]
    lines += [f"  {name:<18} {EXPERIMENTS[name].summary}" for name in EXPERIMENTS]
    lines += [f"  {name:<18} {_standalone(name).__doc__.strip().splitlines()[0]}" for name in STANDALONE]
    lines += ["", "models:"]
    lines += [f"  {name:<18} {(MODELS[name].__doc__ or '').strip().splitlines()[0]}" for name in MODELS]
    lines += ["", "guides (NAME or NAME:K):"]
    lines += [f"  {name + (':K' if GUIDES[name].arg_name else ''):<18} {GUIDES[name].summary}" for name in GUIDES]
    lines += ["", "data sets (--dataset NAME; or --data FILE.csv|.npy|.npz|.parquet):"]
    for name in dataset_names():
        entry = dataset_entry(name)
        lines.append(f"  {name:<18} [{', '.join(sorted(entry.tags))}] {entry.summary}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from pyro_lvm.harness import EXPERIMENTS

    from . import load_all
    from .cli import run_cli, run_main

    load_all()

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        return 0
    name, rest = args[0].replace("-", "_"), args[1:]
    if name in STANDALONE:
        return run_main(_standalone(name).main, rest)
    if name not in EXPERIMENTS:
        print(f"error: unknown experiment {args[0]!r}; valid: {', '.join([*EXPERIMENTS.names(), *STANDALONE])}; "
              "see pyro-lvm --help", file=sys.stderr)
        return 2
    return run_cli(name, rest)


if __name__ == "__main__":
    sys.exit(main())
