"""The guide registry: variational families selected by name, ``NAME`` or ``NAME:K``.

A family declares what it needs of a model as a function of the model's :class:`ModelTraits`
(known from the model's config alone), so every guide of a run is checked before data are loaded.

A model with both per-point latents and global latent sites (a wrapped function with priors outside the data
plate) takes a pair, ``LOCAL+GLOBAL``: an amortized family for the points and an autoguide for the globals, e.g.
``iaf:2+meanfield`` (:class:`~pyro_lvm.guides.composite.LocalGlobalGuide`).
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyro.nn import PyroModule

from pyro_lvm.config import ConfigError
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


#: joins the local and the global family of a guide pair: ``iaf:2+meanfield``
PAIR = "+"


def split_pair(spec: str) -> tuple[str, str | None]:
    """``"iaf:2+meanfield"`` -> ("iaf:2", "meanfield"); ``"iaf:2"`` -> ("iaf:2", None)."""
    local, sep, glob = spec.strip().partition(PAIR)
    if sep and local.rstrip().endswith(":"):  # "planar:+2": a K with a sign, refused as a K by parse_guide_spec
        return spec.strip(), None
    if sep and (not local.strip() or not glob.strip() or PAIR in glob):
        raise ValueError(f"guide {spec!r}: a pair is written LOCAL+GLOBAL, e.g. iaf:2+meanfield")
    return local.strip(), (glob.strip() if sep else None)


def parse_guide_spec(spec: str) -> tuple[GuideEntry, int | None]:
    """``"planar:10"`` -> (planar entry, 10); ``"amortized"`` -> (entry, None). K is plain decimal digits: ``+2``,
    ``2_0`` or `` 2`` (which ``int`` would read) are refused, so one guide has one spelling."""
    name, _, arg_text = spec.strip().partition(":")
    entry = GUIDES[name]
    if not arg_text:
        return entry, entry.default_arg
    if entry.arg_name is None:
        raise ValueError(f"guide {name!r} takes no ':K' argument (got {spec!r})")
    if not re.fullmatch(r"[0-9]+", arg_text):
        raise ValueError(f"guide {spec!r}: {entry.arg_name} must be written as plain digits, e.g. {name}:2")
    return entry, split_spec(spec, "guide", entry.arg_name)[1]


def canonical_guide_spec(spec: str) -> str:
    """The one spelling of a guide spec: ``NAME``, or ``NAME:K`` with K as plain digits without leading zeros
    (``" planar:02 "`` -> ``"planar:2"``); a pair is ``LOCAL+GLOBAL``, each part spelt so."""
    local, glob = split_pair(spec)
    if glob is not None:
        return f"{canonical_guide_spec(local)}{PAIR}{canonical_guide_spec(glob)}"
    entry, arg = parse_guide_spec(spec)
    return f"{entry.name}:{arg}" if ":" in spec else entry.name


def _identity(spec: str) -> tuple[tuple[str, int | None], ...]:
    """What makes two specs the same guide: each part's (family, K)."""
    return tuple((e.name, a) for e, a in (parse_guide_spec(p) for p in split_pair(spec) if p is not None))


def canonical_guide_specs(specs: Iterable[str], field: str = "guides") -> tuple[str, ...]:
    """Each spec in its one spelling (:func:`canonical_guide_spec`); a guide named twice is refused (it would train
    the same guide again under another name; ``planar`` and ``planar:<its default K>`` are one guide too) with a
    ``ConfigError`` naming ``field``."""
    seen: dict[tuple[tuple[str, int | None], ...], str] = {}  # each part's (family, K) -> the spec naming it first
    out: list[str] = []
    for spec in specs:
        if not spec.strip():
            continue
        try:
            identity = _identity(spec)
            canonical = canonical_guide_spec(spec)
        except (KeyError, ValueError) as e:
            raise ConfigError(field, str(e).strip("'\"")) from None
        first = seen.get(identity)
        if first is not None:
            same = "" if first == spec.strip() else f" ({first!r} and {spec.strip()!r} are the same guide)"
            raise ConfigError(field, f"guide {canonical!r} is given twice{same}; name each guide once")
        seen[identity] = spec.strip()
        out.append(canonical)
    return tuple(out)


def needs_pair(traits: ModelTraits) -> bool:
    """Whether a model's guide must be a pair: it has per-point latents and global latent sites."""
    return traits.structure_known and traits.local_site is not None and bool(traits.global_sites)


def _example_pair(spec: str) -> str:
    """A pair that completes ``spec``, a local or a global family named alone."""
    entry, _ = parse_guide_spec(spec)
    return f"amortized+{spec}" if _is_global_family(entry) else f"{spec}+meanfield"


def _is_global_family(entry: GuideEntry) -> bool:
    """Whether a family guides global latents: it accepts a model that has them and no per-point latent."""
    return entry.requires(ModelTraits("m", None, ("θ",), None, False, "trace", ())) is None


def usable_guides(traits: ModelTraits) -> list[str]:
    names = [n for n in GUIDES if GUIDES[n].requires(traits) is None]
    if needs_pair(traits):
        local = [n for n in names if GUIDES[n].requires(dataclasses.replace(traits, global_sites=())) is None]
        glob = [n for n in names if n not in local]
        return [f"{a}+{b}" for a in local for b in glob]
    return names


def check_guide(spec: str, traits: ModelTraits) -> tuple[GuideEntry, int | None]:
    """Parse ``spec`` and check it fits a model with ``traits``; the error lists the usable guides. For a pair
    ``LOCAL+GLOBAL``, the local family's entry is returned (each part checked against its half of the model)."""
    local, glob = split_pair(spec)
    if glob is None and needs_pair(traits):
        raise ValueError(f"guide {spec.strip()!r} cannot be used here: {traits.name} has per-point latents and "
                         f"global latent sites ({', '.join(traits.global_sites)}); name a family for each, "
                         f"LOCAL+GLOBAL, e.g. {_example_pair(local)}")
    if glob is not None:
        if traits.structure_known and not traits.global_sites:
            raise ValueError(f"guide {spec.strip()!r} cannot be used here: {traits.name} has no global latent "
                             f"sites; name the local family alone ({local})")
        for part, half in ((local, dataclasses.replace(traits, global_sites=())),
                           (glob, dataclasses.replace(traits, local_site=None))):
            entry, _ = parse_guide_spec(part)
            reason = entry.requires(half) if traits.structure_known else None
            if reason is not None or (part is local and _is_global_family(entry)):  # a global family on the left
                raise ValueError(f"guide {spec.strip()!r}: {part!r} cannot be its "
                                 f"{'local' if part is local else 'global'} half"
                                 f"{': ' + reason if reason else ''}; write LOCAL+GLOBAL, e.g. iaf:2+meanfield")
        return parse_guide_spec(local)
    entry, arg = parse_guide_spec(spec)
    reason = entry.requires(traits) if traits.structure_known or entry.requires is local_continuous_latent else None
    if reason is not None:
        raise ValueError(f"guide {entry.name!r} cannot be used here: {reason}; usable guides: "
                         f"{', '.join(usable_guides(traits))}")
    return entry, arg


def build_guide(spec: str, model: LatentModel, config: GuideConfig | None = None, *,
                data_dim: int | None = None) -> PyroModule:
    """Build the guide named by ``spec`` for ``model``; errors name the valid choices.

    The guide remembers ``spec`` and ``config`` (``guide.spec``, ``guide.guide_config``), which is what
    :func:`pyro_lvm.save` stores to rebuild it.

    ``model`` may be a bare Pyro model function, with ``data_dim`` (the data's width): it is wrapped
    (:func:`pyro_lvm.wrap_model`, defaults) into a model of the guide's own, which ``fit``, ``evaluate``,
    ``to_inference_data``, ``inference_gaps`` and ``save`` find when given the same function and this guide
    (two guides built from one function never share its parameters).
    """
    from pyro_lvm.wrap import remember_wrapped, wrap_for_guide

    model = wrap_for_guide(model, data_dim)
    entry, arg = check_guide(spec, model.traits)
    config = config or GuideConfig()
    local, glob = split_pair(spec)
    if glob is not None:
        from .composite import LocalGlobalGuide

        global_entry, global_arg = parse_guide_spec(glob)
        guide = LocalGlobalGuide(entry.factory(model, config, arg), global_entry.factory(model, config, global_arg))
    else:
        guide = entry.factory(model, config, arg)
    guide.spec, guide.guide_config = spec.strip(), config
    # which model the guide belongs to: a token, not a reference (a guide never holds its model; it pickles)
    guide.__dict__["model_token"] = model.__dict__.setdefault("_guide_token", uuid.uuid4().hex)
    model.bind_guide(guide)  # a prior that shares the guide's encoder (VampPrior) gets it here
    remember_wrapped(guide, model)
    return guide


def check_guide_belongs(model: LatentModel, guide: object) -> None:
    """Refuse (``ValueError`` naming ``guide``) a guide that would train or score the wrong thing with ``model``:
    one built by :func:`build_guide` for another model instance (an ``exact`` guide reads its own model's
    parameters, so with another model it is no longer exact), or whose parameters are of another dtype."""
    token = getattr(guide, "__dict__", {}).get("model_token")
    if token is not None and token != model.__dict__.get("_guide_token"):
        raise ValueError(f"guide: {getattr(guide, 'spec', type(guide).__name__)!r} was built for another model "
                         f"instance than this {type(model).__name__}; build it for this one with "
                         "build_guide(spec, model)")
    params = [p for p in guide.parameters() if p.is_floating_point()] if hasattr(guide, "parameters") else []
    bad = next((p.dtype for p in params if p.dtype != model.dtype), None)
    if bad is not None:
        raise ValueError(f"guide: its parameters are {bad}, the model's {model.dtype}; move both with "
                         f"model.to({model.dtype}) and guide.to({model.dtype})")


def guide_names() -> list[str]:
    return GUIDES.names()
