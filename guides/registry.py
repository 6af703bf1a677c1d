"""The guide registry: variational families selected by name, ``NAME`` or ``NAME:K``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyro.nn import PyroModule
from pyro_lvm.models.base import LatentModel

from pyro_lvm.registry import Registry

from .config import GuideConfig

GuideFactory = Callable[[LatentModel, GuideConfig, int | None], PyroModule]
Requirement = Callable[[LatentModel], str | None]


@dataclass(frozen=True)
class GuideEntry:
    name: str
    factory: GuideFactory
    #: returns why the guide cannot be used with a model, or ``None`` when it can
    requires: Requirement
    #: what ``:K`` means for this family (``None``: the family takes no argument)
    arg_name: str | None = None
    default_arg: int | None = None
    summary: str = ""


GUIDES: Registry[GuideEntry] = Registry("guide")


def local_continuous_latent(model: LatentModel) -> str | None:
    if model.local_site is None:
        return f"{type(model).__name__} has no continuous per-point latent site"
    return None


def exact_posterior_available(model: LatentModel) -> str | None:
    if not model.has_exact_posterior:
        return f"{type(model).__name__} has no closed-form posterior"
    return None


def register_guide(
    name: str,
    *,
    requires: Requirement = local_continuous_latent,
    arg_name: str | None = None,
    default_arg: int | None = None,
    summary: str = "",
) -> Callable[[GuideFactory], GuideFactory]:
    """Register a guide factory ``factory(model, config, arg) -> guide``."""

    def decorate(factory: GuideFactory) -> GuideFactory:
        GUIDES.register(name)(GuideEntry(name, factory, requires, arg_name, default_arg,
                                         summary or (factory.__doc__ or "").strip().split("\n")[0]))
        return factory

    return decorate


def parse_guide_spec(spec: str) -> tuple[GuideEntry, int | None]:
    """``"planar:10"`` -> (planar entry, 10); ``"amortized"`` -> (entry, None)."""
    name, _, arg_text = spec.strip().partition(":")
    entry = GUIDES[name]
    if not arg_text:
        return entry, entry.default_arg
    if entry.arg_name is None:
        raise ValueError(f"guide {name!r} takes no ':K' argument (got {spec!r})")
    try:
        arg = int(arg_text)
    except ValueError:
        raise ValueError(f"guide {spec!r}: {entry.arg_name} must be an integer") from None
    if arg < 1:
        raise ValueError(f"guide {spec!r}: {entry.arg_name} must be >= 1")
    return entry, arg


def build_guide(spec: str, model: LatentModel, config: GuideConfig | None = None) -> PyroModule:
    """Build the guide named by ``spec`` for ``model``; errors name the valid choices."""
    entry, arg = parse_guide_spec(spec)
    reason = entry.requires(model)
    if reason is not None:
        ok = [n for n in GUIDES if GUIDES[n].requires(model) is None]
        raise ValueError(f"guide {entry.name!r} cannot be used here: {reason}; usable guides: {', '.join(ok)}")
    guide = entry.factory(model, config or GuideConfig(), arg)
    guide.spec = spec
    return guide


def guide_names() -> list[str]:
    return GUIDES.names()
