"""A small name -> entry registry, used for models, guides, data sets, ELBOs, evaluators and experiments."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """An unknown registry name; the message lists the valid ones."""


def origin_of(entry: object, depth: int = 2) -> tuple[str, str]:
    """Where an entry comes from: a class's or function's (module, qualified name), else (the module that
    registers it, its type's name).

    A module reload re-registers new objects with the same origin, which is harmless; any other
    object under a taken name is a clash.
    """
    if hasattr(entry, "__module__") and hasattr(entry, "__qualname__"):
        return entry.__module__, entry.__qualname__
    return sys._getframe(depth).f_globals.get("__name__", "?"), type(entry).__qualname__


class Registry(Generic[T]):
    """Maps names to entries; ``registry.register(name)`` is a decorator.

    New families are added by registering a new entry in a new file, never by editing a dispatcher.
    Registering the same object twice, or re-registering from the same place (``importlib.reload``), is
    harmless; a different object under a taken name raises ``ValueError``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._origins: dict[str, tuple[str, str]] = {}

    def register(self, name: str, *, origin: tuple[str, str] | None = None) -> Callable[[T], T]:
        """Decorator registering ``entry`` under ``name``; ``origin`` overrides :func:`origin_of`."""

        def decorate(entry: T) -> T:
            nonlocal origin
            origin = origin or origin_of(entry, 2)  # frame 2: the code that registers
            if name in self._entries and self._entries[name] is not entry and self._origins[name] != origin:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._origins[name][0]})")
            self._entries[name] = entry
            self._origins[name] = origin
            return entry

        return decorate

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(sorted(self._entries))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(k, self._entries[k]) for k in sorted(self._entries)]


MODELS: Registry[type] = Registry("model")


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`~pyro_lvm.models.base.LatentModel` under ``name`` (also ``cls.name``).
    Its ``Config`` dataclass, unless it writes its own ``__repr__``, prints the fields that differ from their
    defaults (:func:`pyro_lvm.config.readable`)."""

    def decorate(cls: type) -> type:
        from pyro_lvm.config import readable

        cls.name = name  # type: ignore[attr-defined]
        if isinstance(getattr(cls, "Config", None), type):
            readable(cls.Config)  # type: ignore[attr-defined]
        return MODELS.register(name)(cls)

    return decorate


def split_spec(spec: str, what: str, arg_name: str) -> tuple[str, int | None]:
    """``"NAME:K"`` -> (NAME, K) with K a positive integer; ``"NAME"`` -> (NAME, None). ``what`` and ``arg_name`` name
    the spec's kind and its K in the ``ValueError`` for a K that is not an integer >= 1."""
    name, _, text = str(spec).strip().partition(":")
    if not text:
        return name, None
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"{what} {spec!r}: {arg_name} must be an integer") from None
    if k < 1:
        raise ValueError(f"{what} {spec!r}: {arg_name} must be >= 1")
    return name, k
