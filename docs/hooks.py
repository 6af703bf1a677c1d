"""MkDocs hooks (``hooks:`` in mkdocs.yml): the generated pages and the checks that keep the site whole.

* ``reference/cli.md`` is generated from the command line itself: every experiment's argparse parser is built by the
  code that ``pyro-lvm NAME`` runs (``pyro_lvm.experiments.cli``), stopped before it parses, and each flag is listed
  with its type (the config field's annotation), default and help (the field's ``#:`` comment). One source of
  truth: a field added to a config appears here at the next build.
* Every name in ``pyro_lvm.__all__`` must be documented by a ``::: pyro_lvm.NAME`` block under ``reference/api/``
  (see :func:`api_identifier`); one that is not fails the build (an error, so ``mkdocs build`` stops, strict or
  not).
* mkdocstrings reads the source statically; the installed package maps ``models/``, ``guides/`` and
  ``experiments/`` into ``pyro_lvm`` (setuptools' ``package-dir``), so a tree of symbolic links with the installed
  layout is laid under ``build/docs_src`` for it (``paths`` in mkdocs.yml).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib
import logging
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
SOURCE_TREE = ROOT / "build" / "docs_src"
#: installed subpackage -> folder of the repository (as pyproject.toml's [tool.setuptools.package-dir])
SUBPACKAGES = {"models": "models", "guides": "guides", "experiments": "experiments"}
CLI_PAGE = "reference/cli.md"
API_DIR = "reference/api"

log = logging.getLogger("mkdocs.hooks.pyro_lvm")


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.exists():
        link.unlink(missing_ok=True)
    try:
        link.symlink_to(target)
    except FileExistsError:  # another build laid it at the same moment
        pass


def lay_source_tree() -> None:
    """``build/docs_src/pyro_lvm``: the package as installed, made of links to the repository's files."""
    package = SOURCE_TREE / "pyro_lvm"
    package.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in (ROOT / "pyro_lvm").iterdir() if p.suffix == ".py"}
    wanted.update({name: ROOT / folder for name, folder in SUBPACKAGES.items()})
    for name, target in wanted.items():
        _link(package / name, target)
    for stale in package.iterdir():
        if stale.name not in wanted and stale.is_symlink():
            stale.unlink()


lay_source_tree()  # at import: before mkdocstrings reads any source


# --------------------------------------------------------------------------- the command-line reference

class _Built(BaseException):
    """Raised in place of parsing: carries the parser the command would have parsed with."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _parser_of(run: Any) -> argparse.ArgumentParser:
    """The parser ``run()`` builds: ``ArgumentParser.parse_args`` is replaced for the call by one that hands it
    back, so the parser is exactly the command's own."""
    from pyro_lvm.experiments import cli

    original = cli.ArgumentParser.parse_args

    def hand_back(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        raise _Built(self)

    cli.ArgumentParser.parse_args = hand_back  # type: ignore[method-assign]
    try:
        run()
    except _Built as built:
        return built.parser
    finally:
        cli.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise PluginError(f"{run!r} did not build an argument parser")


def _type_name(tp: Any) -> str:
    """``int | None`` -> ``int`` or ``None`` (one code span per alternative: a pipe would split the table cell)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    text = getattr(tp, "__name__", None) if not args else None
    return (text or str(tp).replace("typing.", "")).replace("NoneType", "None")


def _annotations(*classes: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in classes:
        if dataclasses.is_dataclass(cls):
            out.update(typing.get_type_hints(cls))
    return out


def plain(text: str) -> str:
    """Help text without reStructuredText markup, for Markdown: ``x`` and :role:`x` become `x`."""
    text = re.sub(r":(?:math|class|func|meth|data|attr|mod|obj|exc):`~?([^`]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: HTML-escaped outside code spans (help mentions ``<guide>.nc``), pipes
    escaped, one line."""
    parts = plain(text).replace("\n", " ").split("`")
    parts = [p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts)]
    return "`".join(parts).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is None or value is argparse.SUPPRESS or value == ():
        return "—"
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f"`{value}`"


def _flag_rows(parser: argparse.ArgumentParser, hints: dict[str, Any]) -> list[str]:
    rows = ["| flag | type | default | help |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags = " ".join(f"`{o}`" for o in action.option_strings)
        if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action, argparse._StoreTrueAction):
            kind = "flag"
        elif action.dest in hints:
            kind = _type_name(hints[action.dest])
        else:
            kind = getattr(action.type, "__name__", None) or "str"
            if kind == "parse":  # a comma-separated list parser from cli._parser_for
                kind = action.metavar or "list"
        kind = " or ".join(f"`{k}`" for k in kind.split(" or "))
        if action.choices:
            kind += "<br>one of " + ", ".join(f"`{c}`" for c in action.choices)
        help_text = action.help or ""
        help_text = re.sub(r"\s*\(default: [^)]*\)\s*$", "", help_text)  # the default has its own column
        rows.append(f"| {flags} | {kind} | {_default(action)} | {_cell(help_text)} |")
    return rows


def _summary(doc: str | None) -> str:
    lines = [ln for ln in (doc or "").strip().splitlines()]
    return plain(lines[0]) if lines else ""


def cli_reference() -> str:
    from pyro_lvm.experiments import STANDALONE, cli, load_all
    from pyro_lvm.harness import EXPERIMENTS
    from pyro_lvm.train import TrainConfig

    load_all()
    out = ["# Command-line reference", "",
           "Generated from the command line's own parsers at every build (`docs/hooks.py`): each flag of "
           "`pyro-lvm NAME` is a field of the experiment's config dataclass (or of `TrainConfig`), with its type, "
           "default and help read from the field. `pyro-lvm --help` lists the experiments, models, guides and data "
           "sets; `pyro-lvm NAME --help` shows the same flags as below. Every experiment also runs as "
           "`python -m pyro_lvm.experiments.NAME`.", "",
           "Bad flags or values give a one-line `error:` on stderr and exit status 2; see "
           "[Faults, resume and files](../guide/faults.md).", ""]
    out += ["| experiment | what it runs |", "|---|---|"]
    names = [*EXPERIMENTS.names(), *STANDALONE]
    for name in EXPERIMENTS.names():
        out.append(f"| [`{name}`](#{name}) | {_cell(EXPERIMENTS[name].summary)} |")
    for name in STANDALONE:
        module = importlib.import_module(f"pyro_lvm.experiments.{name}")
        out.append(f"| [`{name}`](#{name}) | {_cell(_summary(module.__doc__))} |")
    out.append("")
    for name in names:
        if name in EXPERIMENTS:
            experiment = EXPERIMENTS[name]
            parser = _parser_of(lambda e=experiment: cli.parse_config(e, []))
            hints = _annotations(experiment.Config, TrainConfig)
            doc = importlib.import_module(type(experiment).__module__).__doc__
        else:
            module = importlib.import_module(f"pyro_lvm.experiments.{name}")
            parser = _parser_of(lambda m=module: m.main([]))
            configs = [v for v in vars(module).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
                       and v.__module__ == module.__name__]
            hints = _annotations(*configs, TrainConfig)
            doc = module.__doc__
        out += [f"## {name}", ""]
        if doc:
            out += [html.escape(_summary(doc), quote=False), ""]
        out += [f"```text\n{parser.format_usage().strip()}\n```", ""]
        out += _flag_rows(parser, hints)
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- hooks

def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, CLI_PAGE, content=cli_reference()))
    return files


def api_identifier(name: str) -> str:
    """The identifier that documents public name ``name``: ``pyro_lvm.NAME``, except where a submodule of the same
    name shadows it for a static reader (``pyro_lvm.evaluate`` is both the function and its module): then the
    object's own module path, ``pyro_lvm.evaluate.evaluate``."""
    import importlib.util

    import pyro_lvm

    obj = getattr(pyro_lvm, name)
    if not isinstance(obj, type(pyro_lvm)) and importlib.util.find_spec(f"pyro_lvm.{name}") is not None:
        return f"{obj.__module__}.{name}"
    return f"pyro_lvm.{name}"


def on_pre_build(config: MkDocsConfig) -> None:
    import pyro_lvm

    documented: set[str] = set()
    for page in (Path(config.docs_dir) / API_DIR).glob("*.md"):
        documented.update(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.M))
    missing = sorted(name for name in pyro_lvm.__all__ if api_identifier(name) not in documented)
    if missing:
        raise PluginError(f"public names without an API entry under docs/{API_DIR}/: "
                          f"{', '.join(api_identifier(n) for n in missing)} (add '::: IDENTIFIER' to a page there)")
