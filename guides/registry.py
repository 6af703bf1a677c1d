"""The guide registry: variational families selected by name, ``NAME`` or ``NAME:K``.

A family declares what it needs of a model as a function of the model's :class:`ModelTraits`
(known from the model's config alone), so every guide of a run is checked before data are loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyro.nn import PyroModule

from pyro_lvm.models.base import LatentModel, ModelTraits
from pyro_lvm.registry import Registry, split_spec

from .config import GuideConfig

GuideFactory = Callable[[LatentModel, GuideConfig, int | None], PyroModule]
Requirement = Callable[[ModelTraits], str | None]


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


def local_continuous_latent(traits: ModelTraits) -> str | None:
    if traits.local_site is None:
        return f"{traits.name} has no continuous per-point latent site"
    return None


def exact_posterior_available(traits: ModelTraits) -> str | None:
    if not traits.has_exact_posterior:
        return f"{traits.name} has no closed-form posterior"
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
        entry = GuideEntry(name, factory, requires, arg_name, default_arg,
                           summary or (factory.__doc__ or "").strip().split("\n")[0])
        GUIDES.register(name, origin=(factory.__module__, factory.__qualname__))(entry)
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
    return entry, split_spec(spec, "guide", entry.arg_name)[1]


def usable_guides(traits: ModelTraits) -> list[str]:
    return [n for n in GUIDES if GUIDES[n].requires(traits) is None]


def check_guide(spec: str, traits: ModelTraits) -> tuple[GuideEntry, int | None]:
    """Parse ``spec`` and check it fits a model with ``traits``; the error lists the usable guides."""
    entry, arg = parse_guide_spec(spec)
    reason = entry.requires(traits)
    if reason is not None:
        raise ValueError(f"guide {entry.name!r} cannot be used here: {reason}; usable guides: "
                         f"{', '.join(usable_guides(traits))}")
    return entry, arg


def build_guide(spec: str, model: LatentModel, config: GuideConfig | None = None) -> PyroModule:
    """Build the guide named by ``spec`` for ``model``; errors name the valid choices.

    The guide remembers ``spec`` and ``config`` (``guide.spec``, ``guide.guide_config``), which is what
    :func:`pyro_lvm.save` stores to rebuild it.
    """
    entry, arg = check_guide(spec, model.traits)
    config = config or GuideConfig()
    guide = entry.factory(model, config, arg)
    guide.spec, guide.guide_config = spec.strip(), config
    model.bind_guide(guide)  # a prior that shares the guide's encoder (VampPrior) gets it here
    return guide


def guide_names() -> list[str]:
    return GUIDES.names()
