"""A Griffe extension for the API reference: the docstrings' reStructuredText markup, rendered as Markdown.

The library's docstrings are plain prose with reST roles (:func:`fit`, :class:`~pyro_lvm.config.ConfigError`,
:math:`x`), double-backtick literals and ``.. math::`` blocks. mkdocstrings renders docstrings as Markdown, where
those would show as raw markup; this extension rewrites them when Griffe loads each object (nothing in the library
changes):

* ``:role:`target``` and ``:role:`~a.b.target``` become code spans (`target`), ``.. math::`` blocks become
  indented text blocks, so formulas keep their line breaks;
* double-backtick literals are already Markdown code spans and stay as they are;
* an attribute without a docstring gets its ``#:`` comment (the config dataclasses document each field so, and the
  command line reads the same comments for ``--help``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:math|class|func|meth|data|attr|mod|obj|exc|ref|py:\w+):`~?([^`]+)`")


def rest_to_markdown(text: str) -> str:
    text = ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            indent = len(line) - len(line.lstrip())
            block: list[str] = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            body = [b.strip() for b in block if b.strip()]
            out += ["```text", *body, "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def field_comment(obj: Any) -> str | None:
    """The ``#:`` comment lines right above an attribute's first line, joined, or ``None``."""
    try:
        lines = obj.lines_collection[obj.filepath]
    except (KeyError, AttributeError, TypeError):
        return None
    if not obj.lineno or obj.lineno < 2:
        return None
    comment: list[str] = []
    i = obj.lineno - 2  # the line above, 0-based
    while i >= 0 and lines[i].strip().startswith("#:"):
        comment.insert(0, lines[i].strip()[2:].strip())
        i -= 1
    return " ".join(comment) or None


class RestRoles(griffe.Extension):
    """Rewrite each object's docstring as it is loaded."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:  # griffe >= 1: every object, once
        if getattr(obj, "is_attribute", False) and obj.docstring is None:
            comment = field_comment(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and docstring.value:
            docstring.value = rest_to_markdown(docstring.value)
