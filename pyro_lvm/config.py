"""Typed config dataclasses: range checks at construction, and a round trip through plain dicts.

Every config of the library (models, guides, training, evaluation, data, experiments) is a dataclass
that checks its own fields in ``__post_init__`` with :func:`check_config`, so a bad value fails where it
is set — in the API as a ``ValueError`` naming the field, on the command line as one ``error:`` line
naming the flag — and never deep inside a fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

C = TypeVar("C")

#: the largest seed: every RNG a seed reaches accepts [0, 2**32 - 1] (NumPy's legacy ``np.random.seed``, which
#: ``pyro.set_rng_seed`` calls, and scikit-learn's ``random_state``; torch would take up to 2**64 - 1)
MAX_SEED = 2**32 - 1
#: the most torch threads a config may ask for. A fixed number, not a multiple of this machine's cores, so a config
#: valid on one machine is valid on every one: above the hardware threads of the largest single machines (2 x 192
#: cores x 2), and far below where OpenMP's thread creation fails (100,000 threads crashed the process); more threads
#: than cores only oversubscribe them
MAX_THREADS = 1024
#: upper bounds of integer fields, by field name, wherever a config checks them as ``positive_int``/``nonneg_int``
UPPER_LIMITS = {"threads": MAX_THREADS}
#: bytes a parameter costs while training: itself, its gradient and Adam's two moments, 4 numbers of 4 bytes (float32)
TRAINING_BYTES_PER_PARAMETER = 16


class ConfigError(ValueError):
    """A config field with a bad value; ``field`` names it (the command line turns it into the flag)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


def check_config(
    cfg: object,
    *,
    positive_int: Iterable[str] = (),
    nonneg_int: Iterable[str] = (),
    positive: Iterable[str] = (),
    nonneg: Iterable[str] = (),
    unit: Iterable[str] = (),
    layers: Iterable[str] = (),
    seeds: Iterable[str] = ("seed",),
) -> None:
    """Check numeric fields of ``cfg`` (``None`` values are skipped: they mean "not set").

    ``positive_int``: integers >= 1; ``nonneg_int``: integers >= 0; ``positive``: finite numbers > 0;
    ``nonneg``: finite numbers >= 0; ``unit``: finite numbers in (0, 1]; ``layers``: sequences of layer
    sizes, each an integer >= 1 (empty allowed: no hidden layer). Integer fields named in :data:`UPPER_LIMITS`
    (``threads``) are also held below their limit. ``seeds``: fields holding an RNG seed, integers in
    [0, :data:`MAX_SEED`]; by default ``seed``, where ``cfg`` has one, so every config's seed gets the same range.
    """
    def value(name: str) -> Any:
        return getattr(cfg, name)

    for name in positive_int:
        v = value(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(name, f"must be an integer >= 1, got {v!r}")
        check_upper_limit(name, v)
    for name in nonneg_int:
        v = value(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConfigError(name, f"must be an integer >= 0, got {v!r}")
        check_upper_limit(name, v)
    for name in seeds:
        if hasattr(cfg, name):
            check_seed(value(name), name)
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (nonneg, lambda v: v >= 0, ">= 0"),
                            (unit, lambda v: 0 < v <= 1, "in (0, 1]")):
        for name in names:
            v = value(name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not ok(v):
                raise ConfigError(name, f"must be a finite number {what}, got {v!r}")
    for name in layers:
        v = value(name)
        if v is not None and any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in v):
            raise ConfigError(name, f"layer sizes must be integers >= 1, got {tuple(v)}")


def check_seed(seed: Any, name: str = "seed") -> None:
    """``seed``: ``None`` (not set) or an integer in [0, :data:`MAX_SEED`]; else a ``ConfigError`` naming ``name``."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(name, f"must be an integer in [0, 2**32 - 1], got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(name, f"must be in [0, 2**32 - 1] = [0, {MAX_SEED}] (the range NumPy and scikit-learn "
                          f"accept), got {seed}; pick a seed in that range")


def check_upper_limit(name: str, v: Any) -> None:
    """An integer field named in :data:`UPPER_LIMITS` must not exceed its limit."""
    limit = UPPER_LIMITS.get(name)
    if limit is not None and isinstance(v, int) and v > limit:
        raise ConfigError(name, f"must be at most {limit}, got {v}; more threads than cores only oversubscribe them "
                          f"(this machine has {os.cpu_count()})")


def dense_parameters(sizes: Sequence[int]) -> int:
    """Weights and biases of dense layers ``sizes[0] -> sizes[1] -> ...``."""
    return sum((a + 1) * b for a, b in zip(sizes, sizes[1:], strict=False))


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (``None`` where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_parameter_memory(name: str, parameters: int, what: str,
                           bytes_per_parameter: int = TRAINING_BYTES_PER_PARAMETER) -> None:
    """Refuse, before anything is allocated, networks whose training state (``parameters`` x ``bytes_per_parameter``:
    parameter, gradient, Adam's two moments) would not fit in this machine's physical memory; the
    ``ConfigError`` names field ``name`` and gives the estimate in GB."""
    need, have = parameters * bytes_per_parameter, physical_memory()
    if have is not None and need > have:
        raise ConfigError(name, f"{what} would have {parameters:,} parameters, about {need / 1e9:,.1f} GB to train "
                          f"(parameters, gradients and optimiser state), more than this machine's {have / 1e9:.1f} GB "
                          "of memory; use smaller layers")


def check_split(cfg: object, name: str = "split") -> None:
    """``getattr(cfg, name)``: three finite fractions train,valid,test, each >= 0, summing to 1, with train
    and test > 0 (a fit needs training points; the held-out scores need test points)."""
    v = tuple(getattr(cfg, name))
    if len(v) != 3:
        raise ConfigError(name, f"expected three fractions train,valid,test, got {v}")
    if any(isinstance(f, bool) or not isinstance(f, int | float) or not math.isfinite(f) or f < 0 for f in v):
        raise ConfigError(name, f"fractions must be finite numbers >= 0, got {v}")
    if not math.isclose(sum(v), 1.0, abs_tol=1e-9):
        raise ConfigError(name, f"fractions must sum to 1, got {v} (sum {sum(v):g})")
    if v[0] == 0 or v[2] == 0:
        raise ConfigError(name, f"the train and test fractions must be > 0, got {v}")


def check_choice(cfg: object, name: str, choices: Iterable[str]) -> None:
    """``getattr(cfg, name)`` must be one of ``choices`` (``None`` allowed when the field may be unset)."""
    v, choices = getattr(cfg, name), list(choices)
    if v is not None and v not in choices:
        raise ConfigError(name, f"unknown value {v!r}; valid: {', '.join(choices)}")


def to_dict(cfg: object) -> dict[str, Any]:
    """A JSON-friendly dict of a (possibly nested) config dataclass: tuples as lists, dtypes as names."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if v is None or isinstance(v, bool | int | float | str):
            return v
        return str(v).removeprefix("torch.")  # torch.float64 -> "float64"

    return plain(cfg)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config dataclass from :func:`to_dict`'s output (lists back to tuples, nested configs rebuilt)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data or not f.init:
            continue
        kwargs[f.name] = _coerce(hints.get(f.name, Any), data[f.name])
    return cls(**kwargs)


def _coerce(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _coerce(arg, v)
    if dataclasses.is_dataclass(tp) and isinstance(v, dict):
        return from_dict(tp, v)
    if origin is tuple and isinstance(v, list):
        args = typing.get_args(tp)
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        return tuple(_coerce(inner, x) if inner else x for x in v)
    if tp is tuple and isinstance(v, list):
        return tuple(v)
    if str(tp).startswith("torch.dtype") or tp.__class__.__name__ == "dtype":
        import torch

        return getattr(torch, v) if isinstance(v, str) else v
    return v


# ---------------------------------------------------------------------------------------------
# How a config prints: the fields that differ from their defaults (scikit-learn's ``print_changed_only``)

#: a config's repr wraps to lines of at most this many characters and shows at most :data:`REPR_LINES` lines
REPR_WIDTH = 100
REPR_LINES = 5


def changed_fields(cfg: object, base: object | None = None) -> dict[str, Any]:
    """The fields of dataclass ``cfg`` that differ from their defaults (``base``'s values, where given), in field
    order (a field without a default, e.g. a model config's ``data_dim``, always counts as changed)."""
    out = {}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        if not f.repr:
            continue
        value = getattr(cfg, f.name)
        if base is not None:
            default = getattr(base, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            out[f.name] = value
            continue
        try:
            same = bool(value == default) and isinstance(value, bool) == isinstance(default, bool)
        except Exception:  # noqa: BLE001 - values that do not compare to one bool (arrays): shown
            same = False
        if not same:
            out[f.name] = value
    return out


def config_repr(cfg: object, base: object | None = None) -> str:
    """``TrainConfig(epochs=5, lr=0.01)``: the class and the fields that differ from their defaults (from ``base``'s
    values, where given), wrapped to :data:`REPR_WIDTH` characters a line and cut to :data:`REPR_LINES` lines
    (``dataclasses.asdict`` lists every field); ``TrainConfig()`` where none differs. A nested config shows what
    differs from the default's nested config (an experiment's ``train=TrainConfig(epochs=7)``: the experiment's own
    training defaults are not news)."""
    name = type(cfg).__name__
    defaults = {}
    if base is None and dataclasses.is_dataclass(cfg):
        with contextlib.suppress(TypeError, ValueError):  # a config with required fields has no default instance
            defaults = {f.name: getattr(type(cfg)(), f.name) for f in dataclasses.fields(cfg)}
    parts = []
    for k, v in changed_fields(cfg, base).items():
        nested = getattr(base, k, None) if base is not None else defaults.get(k)
        if dataclasses.is_dataclass(v) and not isinstance(v, type) and type(nested) is type(v) and \
                type(v).__repr__ is config_repr:
            parts.append(f"{k}={' '.join(line.strip() for line in config_repr(v, nested).splitlines())}")
        else:
            parts.append(f"{k}={v!r}")
    one = f"{name}({', '.join(parts)})"
    if len(one) <= REPR_WIDTH:
        return one
    indent = " " * (len(name) + 1)
    lines, line = [], f"{name}("
    for i, part in enumerate(parts):
        piece = part + (", " if i < len(parts) - 1 else ")")
        if len(line) + len(piece.rstrip()) > REPR_WIDTH and line.strip() not in (f"{name}(", ""):
            lines.append(line.rstrip())
            line = indent
        line += piece
    lines.append(line)
    if len(lines) > REPR_LINES:
        shown = "".join(lines[:REPR_LINES - 1]).count("=")
        lines = [*lines[:REPR_LINES - 1], f"{indent}... {len(parts) - shown} more changed fields "
                                          "(dataclasses.asdict lists every field))"]
    return "\n".join(lines)


def _dataclass_made(fn: Any) -> bool:
    """Whether ``fn`` is the ``__repr__`` that ``@dataclass`` wrote (code generated from a string), not one of the
    class's own."""
    code = getattr(getattr(fn, "__wrapped__", fn), "__code__", None)
    return code is not None and code.co_filename == "<string>"


def readable(cls: type[C]) -> type[C]:
    """Make config dataclass ``cls`` print as :func:`config_repr` (changed fields only), unless it defines its own
    ``__repr__``; equality, ``dataclasses.asdict`` and :func:`to_dict` are untouched. Returns ``cls``."""
    if dataclasses.is_dataclass(cls) and _dataclass_made(cls.__dict__.get("__repr__")):
        cls.__repr__ = config_repr  # type: ignore[method-assign]
    return cls


class ReadableConfig:
    """Base of the library's config dataclasses: each subclass (and its subclasses) prints as :func:`config_repr`,
    the fields that differ from their defaults, unless it writes its own ``__repr__``. (Set before ``@dataclass``
    runs, which then keeps it: the generated repr would list every field, 40 of a ``TrainConfig``.)"""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = config_repr  # type: ignore[method-assign]
