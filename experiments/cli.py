"""Command-line plumbing: flags generated from the config dataclasses, one-line errors, exit codes.

A setting is declared once, as a typed field of a config dataclass with a ``#:`` comment; its flag
(``--latent-dim``), its type, its default and its help text are read from there. Values are checked by
the config itself (``__post_init__``), so the API and the command line refuse the same things with the
same words; here a :class:`~pyro_lvm.config.ConfigError` on field ``latent_dim`` becomes
``error: --latent-dim: must be an integer >= 1, got 0`` and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import re
import shlex
import signal
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from pyro_lvm.config import ConfigError
from pyro_lvm.guides.registry import canonical_guide_specs
from pyro_lvm.harness import EXPERIMENTS, TRAINER_FLAGS, Experiment, ExperimentConfig, run_experiment, stopped_line
from pyro_lvm.registry import UnknownNameError
from pyro_lvm.report import results_table
from pyro_lvm.runtime import ACCELERATORS, cli_threads
from pyro_lvm.train import OPTIMIZERS, PRECISIONS, STEPS, STRATEGIES, TrainConfig, TrainingError, default_warmup

#: errors that are the user's to fix: reported in one line, exit status 2, no traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, UnknownNameError, TrainingError)

#: config field -> flag name where they differ
FLAG_NAMES = {"guides": "guide"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``error: ...; see --help``) and exit status 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def flag(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name).replace("_", "-")


def field_help(cls: type) -> dict[str, str]:
    """The ``#:`` comment above each field of a dataclass (and its bases): the field's documentation."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comment: list[str] = []
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith("#:"):
                comment.append(stripped[2:].strip())
                continue
            m = re.match(r"(\w+)\s*:", stripped)
            if m and comment:
                out[m.group(1)] = " ".join(comment)
            comment = []
    return out


def _parser_for(tp: Any) -> tuple[Callable[[str], Any], str | None]:
    """(argparse type, metavar) for a field's annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _parser_for(inner[0])
    if origin is tuple:
        item = args[0]
        conv = {int: int, float: float, str: str}[item]

        def parse(text: str) -> tuple[Any, ...]:
            try:
                return tuple(conv(t.strip()) for t in text.split(",") if t.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}")\
                    from None

        return parse, f"{item.__name__.upper()}[,...]"

    def scalar(text: str) -> Any:
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an' if tp is int else 'a'} {tp.__name__}, got {text!r}")\
                from None

    return scalar, None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any, *,
                         only: Sequence[str] | None = None, exclude: Sequence[str] = (),
                         choices: dict[str, Callable[[], list[str]]] | None = None) -> list[str]:
    """Add one flag per field of dataclass ``cls`` (defaults from ``defaults``); returns the field names added."""
    hints, docs = typing.get_type_hints(cls), field_help(cls)
    added = []
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in exclude or dataclasses.is_dataclass(hints[f.name]):
            continue
        tp, default = hints[f.name], getattr(defaults, f.name)
        help_text = plain_text(docs.get(f.name, ""))
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        told = "default" in help_text  # the comment already says what the default means
        kwargs: dict[str, Any] = {"dest": f.name, "default": default,
                                  "help": help_text if told else f"{help_text} (default: {shown})".strip()}
        if tp is bool or set(typing.get_args(tp)) == {bool, type(None)}:  # bool | None: unset means "decide"
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"], metavar = _parser_for(tp)
            if metavar:
                kwargs["metavar"] = metavar
            if choices and f.name in choices:
                kwargs["choices"] = choices[f.name]()
        parser.add_argument(flag(f.name), **kwargs)
        added.append(f.name)
    return added


def plain_text(doc: str) -> str:
    """A docstring as a terminal shows it: reStructuredText roles, literals and math markup taken out
    (``:func:`pyro_lvm.fit``` -> ``pyro_lvm.fit``, ````x```` -> ``x``, ``:math:`\\mathcal N``` -> ``N``)."""
    text = re.sub(r":math:`([^`]*)`", lambda m: _plain_math(m.group(1)), doc)
    text = re.sub(r":[a-z]+:`~?([^`]*)`", r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"^\s*\.\. math::\s*$", "", text, flags=re.M)
    return text.replace("\\ ", "")


def _plain_math(tex: str) -> str:
    tex = re.sub(r"\\(mathcal|mathrm|mathbf|operatorname)\{([^}]*)\}", r"\2", tex)
    for macro, char in (("\\mid", "|"), ("\\sim", "~"), ("\\le", "≤"), ("\\ge", "≥"), ("\\sum", "Σ"),
                        ("\\theta", "θ"), ("\\mu", "μ"), ("\\sigma", "σ"), ("\\psi", "ψ"), ("\\Psi", "Ψ")):
        tex = tex.replace(macro, char)
    return tex.replace("\\", "").replace("{", "").replace("}", "")


def parse_config(experiment: Experiment, argv: Sequence[str] | None,
                 notes: list[str] | None = None) -> ExperimentConfig:
    """Flags of ``experiment``'s config (and the TrainConfig fields it exposes) -> a checked config. Where a default
    had to give way to the flags given (the experiment's KL warm-up to a shorter ``--epochs``), a line saying so is
    appended to ``notes``."""
    cls, defaults = experiment.Config, experiment.Config()
    p = ArgumentParser(prog=f"pyro-lvm {experiment.name}",
                       description=plain_text(sys.modules[type(experiment).__module__].__doc__ or ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"accelerator": lambda: list(ACCELERATORS), "strategy": lambda: list(STRATEGIES),
               "precision": lambda: list(PRECISIONS), "optimizer": OPTIMIZERS.names, "step": lambda: list(STEPS),
               **getattr(experiment, "choices", {})}
    top = add_config_arguments(p, cls, defaults, choices=choices)
    train = add_config_arguments(p, TrainConfig, defaults.train, only=(*experiment.train_flags, *TRAINER_FLAGS),
                                 exclude=top, choices=choices)
    ns = p.parse_args(argv)
    try:
        if "guides" in top:  # one spelling per guide, each guide once (the configs check it again)
            ns.guides = canonical_guide_specs(ns.guides)
        train_kwargs = {k: getattr(ns, k) for k in train}
        if "warmup_epochs" in train and "warmup_epochs" not in _given(p, argv, ("warmup_epochs",)):
            # the experiment's default warm-up gives way to a shorter --epochs; a warm-up the user chose does not
            epochs = train_kwargs.get("epochs", defaults.train.epochs)
            default = train_kwargs["warmup_epochs"]
            warmup = default_warmup(default, epochs)
            if warmup != default and notes is not None:
                notes.append(f"note: --epochs {epochs} leaves no epoch after the default {default} epochs of KL "
                             f"warm-up; warm-up shortened to {warmup} (set --warmup-epochs to choose)")
            train_kwargs["warmup_epochs"] = warmup
        train_cfg = dataclasses.replace(defaults.train, **train_kwargs)
        return cls(**{k: getattr(ns, k) for k in top}, train=train_cfg)
    except ConfigError as e:
        p.error(f"{flag(e.field)}: {e.reason}")


def _given(p: argparse.ArgumentParser, argv: Sequence[str] | None, names: Sequence[str]) -> set[str]:
    """Which of the flags of fields ``names`` the command line gives (argparse reports a default and a value given
    equal to it alike, so the arguments are parsed once more with a marker as the default)."""
    marker = object()
    saved = {a.dest: a.default for a in p._actions if a.dest in names}
    p.set_defaults(**dict.fromkeys(saved, marker))
    try:
        ns = p.parse_args(argv)
    finally:
        p.set_defaults(**saved)
    return {name for name in saved if getattr(ns, name) is not marker}


def run_cli(experiment: Experiment | str, argv: Sequence[str] | None = None) -> int:
    """``pyro-lvm NAME [flags]``: parse, run, print the table; user errors are one line and exit 2."""
    if isinstance(experiment, str):
        from pyro_lvm.experiments import load_all

        load_all()
        experiment = EXPERIMENTS[experiment]

    def main() -> int:
        notes: list[str] = []
        cfg = parse_config(experiment, argv, notes)
        cfg = dataclasses.replace(cfg, threads=cli_threads(cfg.threads))
        if not cfg.quiet:
            for line in notes:
                print(line, file=sys.stderr)
        try:
            with terminate_as_exception():
                doc = run_experiment(experiment, cfg)
        except (KeyboardInterrupt, Terminated) as e:
            # finished guides are already in results.json (written after each); each unfinished guide's
            # last.ckpt holds its last whole epoch
            again = " ".join(shlex.quote(a) for a in _command(experiment, argv, cfg.output))
            what, code = ("interrupted", 130) if isinstance(e, KeyboardInterrupt) else ("terminated", 143)
            # --resume only where a checkpoint exists, results.json only where it does
            print(stopped_line(what, cfg.output, again), file=sys.stderr)
            return code
        if not cfg.quiet and doc:  # data-parallel runs: only rank 0 has results to show
            print(results_table(doc))
            print(f"results written to {cfg.output}/results.json")
        return 0

    return run_main(main)


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: no ``except Exception`` in between swallows it)."""


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread, so the run stops as on Ctrl-C (Lightning's own SIGTERM
    handler, installed during a fit, calls this one too)."""
    def handler(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _command(experiment: Experiment, argv: Sequence[str] | None, output: str) -> list[str]:
    """The command that continues this run: the same flags, ``--resume`` pointing at its output."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for a in args:  # drop an earlier --resume
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if not a.startswith("--resume="):
            kept.append(a)
    return ["pyro-lvm", experiment.name, *kept, "--resume", output]


def message(e: BaseException) -> str:
    """An error's message as one line, with no tensor printed (a library's message may embed one)."""
    text = " ".join(str(e).split()) or type(e).__name__
    cut = text.find("tensor(")
    return text if cut < 0 else text[:cut].rstrip(" :,") + " (values omitted)"


def run_main(main: Callable[..., int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; user errors become one ``error:`` line on stderr and exit status 2."""
    try:
        return main(argv) if argv is not None else main()
    except ConfigError as e:
        print(f"error: {flag(e.field)}: {e.reason}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None and not isinstance(e, USER_ERRORS):
            raise
        # the system's own file errors ("[Errno 13] Permission denied: 'x'") as what, where, how to fix
        text = (f"{e.strerror or type(e).__name__} ({e.filename}); check the path and its permissions"
                if e.filename is not None else message(e))
        print(f"error: {text}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"error: {message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    """argparse type for the benchmarks' hand-written parsers: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v
