r"""Your own Pyro model function, as a model every part of the suite accepts.

    def poisson_pca(x):
        W = pyro.param("W", lambda: 0.1 * torch.randn(2, x.shape[-1]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))                 # a positive per-point size factor
            pyro.sample("x", dist.Poisson(s.unsqueeze(-1) * (z @ W).exp()).to_event(1), obs=x)

    model = pyro_lvm.wrap_model(poisson_pca, data_dim=20)
    guide = pyro_lvm.build_guide("iaf:2", model)         # any amortized family
    pyro_lvm.fit(model, guide, x_train, epochs=100, seed=0)
    pyro_lvm.evaluate(model, guide, x_test, iwae_k=100)  # held-out ELBO, IWAE-K and k̂ per point

**What the function must do** (checked when it is wrapped, on a prototype trace of a few points; a violation is
one ``ValueError`` naming the site and the rule): take the data ``x`` (points × features) as its first argument;
put every per-point site inside ``pyro.plate("data", len(x))`` at dim −1; give each local latent site a batch
shape of exactly the points (``(N,)``; its event shape is free) and a continuous support that
``torch.distributions.biject_to`` knows (real, positive, unit interval, simplex, lower-Cholesky, ...); broadcast
over leading batch dims (the evaluator draws many z per point at once, as Pyro's vectorised particles do). Its
learnable quantities are ``pyro.param`` statements (or the weights of a ``PyroModule`` passed instead of a
function; ``load`` rebuilds it as ``cls(data_dim=D)``, or ``cls()``, so its other sizes are its defaults): point
estimates, owned by the wrapped model, so ``fit``, ``save`` and ``load`` see them. Latent
sites outside the data plate are **global latents** θ (any continuous support, under any plates but ``data``,
each with a proper prior); their guide is an autoguide named after the local family, ``LOCAL+GLOBAL``
(``iaf:2+meanfield``). **Discrete local sites** (a cluster label, a count) are summed out exactly where marked
``infer={"enumerate": "parallel"}`` (finite support; index with ``pyro.ops.indexing.Vindex`` so the enumerated
values broadcast): see below. Refused by name: an unmarked discrete site, a discrete global site, local sites
under a further plate.

**Discrete local sites, summed out.** With discrete local sites c the wrapped model's per-point density is the
marginal p(x_n, u_n) = Σ_c p(x_n, u_n, c) (every value of every marked site, in parallel, as ``TraceEnum_ELBO``
enumerates them), computed inside the model: its ELBO and IWAE-K are those of q(u|x) against the collapsed model,
an exact sum rather than a score-function estimate, so the estimator is ``Trace_ELBO`` (the same value as
``TraceEnum_ELBO`` with the sites enumerated in the model). The sum is split into log p(u_n) (the latent sites,
c summed out: the prior, annealed by KL warm-up) and log p(x_n | u_n) (the rest); posterior predictive draws take
c ~ p(c | u_n, x_n), then x̃ ~ p(x | u_n, c). The cost is the product of the sites' support sizes per draw.

**Held-out bounds with global latents.** A held-out point's bounds are bounds on log p(x_n | θ) averaged over
θ_s ~ q(θ) (``EvalConfig.global_draws`` draws; one for a point mass such as ``map``): ELBO_n = mean_s
E_q(z|x_n)[log p(x_n, z | θ_s) − log q(z|x_n)], IWAE-K likewise, so their target is mean_s log p(x_n | θ_s) and
the global prior log p(θ) is not a per-point term. k̂ per point is the largest over the draws θ_s.

**How the guides see it.** The local latent sites of a point are one vector u ∈ ℝ^k in unconstrained space
(site by site, ``biject_to(support)``, in trace order): the model samples u at the site ``_u`` and writes each of
the function's sites back under its own name and support, z_s = T_s(u_s), with log p(z_s) + log |det ∂T_s/∂u_s|.
So log p(x, u) = log p(x, z) + Σ_s log|det J_s| and every amortized family — ``amortized``,
``amortized-fullcov``, the flows — is a q(u|x) with correlations between sites, and its ELBO and IWAE-K are those
of the pushed-forward q(z|x) (the log-dets cancel in p/q). Minibatches are rescaled to the full data set by the
library (``total_size`` is not the function's business).

**The encoder's input** is ``encoder_input(x)``: by default ``log1p`` when the observed site's support is
non-negative counts (raw counts in the thousands would otherwise saturate the encoder), else the identity;
name another (:data:`ENCODER_INPUTS`) to override. It is stored with the model, so :func:`pyro_lvm.load` rebuilds
it, and the function itself is stored by its import path (``package.module:function``), never pickled.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.nn import PyroModule
from pyro.params.param_store import ParamStoreDict
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import biject_to, constraints

from pyro_lvm.config import check_config
from pyro_lvm.models.base import DATA_PLATE, LatentModel, ModelTraits, data_plate, in_data_plate, row_blocks
from pyro_lvm.registry import MODELS, Registry, register_model
from pyro_lvm.runtime import local_state

#: transforms of x applied before every encoder, by name
ENCODER_INPUTS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("encoder input")
ENCODER_INPUTS.register("identity")(lambda x: x)
ENCODER_INPUTS.register("log1p")(lambda x: torch.log1p(x.clamp_min(0)))

#: points in the prototype trace that reads a function's structure
PROTOTYPE_POINTS = 3
#: the site at which the model samples the unconstrained vector of a point's local latents
UNCONSTRAINED_SITE = "_u"


def import_target(target: str) -> Callable[..., Any]:
    """The object named by ``package.module:name`` or ``path/to/file.py:name``; ``ValueError`` saying what to
    import when it cannot be found."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model: {target!r} is not an import path; write package.module:function or "
                         "path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ImportError(f"no file {path}")
            spec = importlib.util.spec_from_file_location(f"pyro_lvm_user_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as e:
        if module_name == "__main__":  # saved from a script or a notebook, as pickle would store it
            raise ValueError(f"model: cannot import {target!r}: {attr} was defined in the script or notebook that "
                             f"saved the fit; define {attr} in the one that loads it too, or keep it in a module "
                             "and wrap it there (wrap_model(fn, data_dim=D) stores its module's path)") from None
        raise ValueError(f"model: cannot import {target!r} ({e}); make the module that defines it importable "
                         "(install it, or run from its directory), or give path/to/file.py:function") from None


def target_of(fn: Any) -> str:
    """The import path a function (or a ``PyroModule``'s class) is stored under."""
    obj = fn if callable(fn) and not isinstance(fn, nn.Module) else type(fn)
    name = getattr(obj, "__qualname__", None)
    if not name:
        raise ValueError(f"fn: {fn!r} has no import path (a functools.partial or a callable object?); write the "
                         "model as a def (or a PyroModule class) at the top level of a module")
    return f"{getattr(obj, '__module__', None) or '__main__'}:{name}"  # code exec'd without a module: __main__'s


def importable(target: str) -> bool:
    """Whether a fresh process could import ``target`` by name: not a lambda or a function defined inside another."""
    return "<lambda>" not in target and "<locals>" not in target


@dataclass(frozen=True)
class LocalSite:
    """One local latent site of a wrapped function: where its values sit in a point's unconstrained vector."""

    name: str
    event_shape: tuple[int, ...]
    #: the shape of its unconstrained values (differs for supports such as the simplex: K → K − 1)
    unconstrained_shape: tuple[int, ...]
    offset: int
    support: Any

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)


@dataclass
class FunctionConfig:
    """A wrapped Pyro model function: its import path and what the suite reads from its prototype trace."""

    data_dim: int
    #: ``package.module:function`` or ``path/to/file.py:function``
    target: str
    #: transform of x before every encoder: a name in ENCODER_INPUTS, or "auto" (log1p for counts)
    encoder_input: str = "auto"
    #: the name results and files give the model ("" → the function's name)
    label: str = ""
    #: import path of the exact log p(x) per point, ``log_likelihood(x, **params) -> (N,)`` with the function's
    #: ``pyro.param`` values by name ("" → none: held-out bounds only)
    log_likelihood: str = ""

    def __post_init__(self) -> None:
        check_config(self, positive_int=("data_dim",))
        if self.encoder_input != "auto":
            ENCODER_INPUTS[self.encoder_input]  # noqa: B018 - an unknown name raises, listing the valid ones


class _ParamStore(Messenger):
    """Serves a function's ``pyro.param`` statements from the wrapped model's own parameters (created, with their
    constraint, the first time a name is seen), so the model owns them: ``fit``, ``save``, ``load`` and
    ``state_dict`` see them and Pyro's global parameter store is never touched."""

    def __init__(self, owner: FunctionModel) -> None:
        super().__init__()
        self.owner = owner

    def __enter__(self) -> _ParamStore:
        # a PyroModule's own parameters (nn.Parameter, PyroParam) stay in the module: with module-local parameters
        # off, a PyroParam would be copied into Pyro's global store and read back by a pyro.param with no value (the
        # module's local parameter state was given once, when the model was built)
        self._local = pyro.settings.context(module_local_params=True)
        self._local.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._local.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            self._local.__exit__(*exc)

    def _pyro_param(self, msg: dict[str, Any]) -> None:
        if getattr(msg["fn"], "__func__", None) is not ParamStoreDict.get_param:
            return  # a PyroModule's own weights: served by the module (module-local parameters)
        name = msg["name"]
        key = name.replace(".", "_")
        store = self.owner._modules["unconstrained"]  # not getattr: a PyroModule attribute read emits a param
        if key not in store:
            args = msg["args"]
            init = args[1] if len(args) > 1 else msg["kwargs"].get("init_tensor")
            if init is None:
                raise ValueError(f"model: pyro.param({name!r}) has no initial value the first time it is seen")
            init = init() if callable(init) else init
            constraint = msg["kwargs"].get("constraint", constraints.real)
            init = torch.as_tensor(init, dtype=self.owner.dtype, device=self.owner.device)
            with torch.no_grad():
                store[key] = nn.Parameter(biject_to(constraint).inv(init).clone())
            self.owner.__dict__["constraints_"][key] = constraint
        msg["value"] = biject_to(self.owner.__dict__["constraints_"][key])(store[key])
        msg["done"] = True


class _Reparametrized(dist.TorchDistribution):
    """A local site's prior scored at z = T(u): log p(z) + log |det ∂T/∂u| (the log-det computed from u)."""

    arg_constraints: dict = {}

    def __init__(self, base: Any, log_det: torch.Tensor) -> None:
        self.base, self.log_det = base, log_det
        batch = torch.broadcast_shapes(base.batch_shape, log_det.shape)
        super().__init__(batch, base.event_shape, validate_args=False)

    @property
    def support(self) -> Any:
        return self.base.support

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value) + self.log_det

    def expand(self, batch_shape: Any, _instance: Any = None) -> _Reparametrized:
        return _Reparametrized(self.base.expand(batch_shape), self.log_det.expand(batch_shape))


class _WriteBack(Messenger):
    """Writes a point's unconstrained vector u back onto the function's local sites: z_s = T_s(u_s), scored by
    :class:`_Reparametrized` and marked so the evaluator counts it in log p(z), not log p(x|z)."""

    def __init__(self, sites: dict[str, LocalSite], u: torch.Tensor) -> None:
        super().__init__()
        self.sites, self.u = sites, u

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        site = self.sites.get(msg["name"])
        if site is None or msg["is_observed"]:
            return
        u = self.u[..., site.offset:site.offset + site.size].reshape(self.u.shape[:-1] + site.unconstrained_shape)
        transform = biject_to(msg["fn"].support)
        if _is_identity(transform):  # a real site: z = u, log-det 0, the prior scored as it is (common; kept cheap)
            msg["value"], msg["is_observed"] = u, True
        else:
            value = transform(u)
            log_det = sum_rightmost(transform.log_abs_det_jacobian(u, value),
                                    len(site.event_shape) - transform.codomain.event_dim)
            msg["value"], msg["fn"], msg["is_observed"] = value, _Reparametrized(msg["fn"], log_det), True
        msg["infer"] = {**msg.get("infer", {}), "pyro_lvm_local": True}


def _is_identity(transform: Any) -> bool:
    """Whether ``biject_to(support)`` is the identity (real supports: an empty composition, maybe made
    independent over event dims)."""
    from torch.distributions import transforms as T

    while isinstance(transform, T.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, T.ComposeTransform) and not transform.parts


def _is_discrete(fn: Any) -> bool:
    return getattr(fn.support, "is_discrete", False)


def _base_distribution(fn: Any) -> Any:
    """``fn`` without the wrappers that keep its density's kind (``.to_event``, ``.mask``, ``.expand``)."""
    while isinstance(fn, dist.Independent | dist.MaskedDistribution | dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn


def _global_site(name: str, fn: Any) -> str:
    """``name``, once its distribution is checked to be a prior an autoguide can guide: continuous, proper, with a
    support ``biject_to`` knows."""
    if _is_discrete(fn):
        raise ValueError(f"model: global latent site {name!r} is discrete ({type(fn).__name__}); discrete global "
                         "latents are not supported: make it a pyro.param, or sum it out in the function")
    base = _base_distribution(fn)
    if isinstance(base, dist.ImproperUniform | _Reparametrized):
        raise ValueError(f"model: global latent site {name!r} has no prior ({type(base).__name__}); give it a "
                         "proper distribution, or make it a pyro.param point estimate")
    try:
        biject_to(fn.support)
    except NotImplementedError:
        raise ValueError(f"model: global latent site {name!r} has support {fn.support}, which has no bijection "
                         "from real space (torch.distributions.biject_to)") from None
    return name


class _PlaceholderValues(Messenger):
    """In the prototype trace only: a site whose distribution cannot be sampled (an improper prior) gets a value in
    its support, so the trace is read to the end and the site is refused by its rule, by name."""

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        fn = msg["fn"]
        if msg["value"] is None and isinstance(_base_distribution(fn), dist.ImproperUniform):
            msg["value"] = biject_to(fn.support)(torch.zeros(fn.shape()))


class _ScalePerPoint(Messenger):
    """Scales the log-density of every site inside the data plate by ``scale`` (N / minibatch): the function's
    per-point sites, not its global priors."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict[str, Any]) -> None:
        if self.scale != 1.0 and in_data_plate(msg):
            msg["scale"] = msg["scale"] * self.scale


#: the site at which a model with discrete local sites scores log p(u_n), those sites summed out
DISCRETE_PRIOR_SITE = "_prior_summed"


def _is_plate_site(msg: dict[str, Any]) -> bool:
    """The subsample site a ``pyro.plate("data", ...)`` records (the function's own, or ours)."""
    return msg["type"] == "sample" and msg["name"] == DATA_PLATE


def _discrete_local_site(name: str, site: dict[str, Any]) -> str:
    """``name``, once the discrete local site is checked to be one that enumeration can sum out."""
    fn = site["fn"]
    how = site["infer"].get("enumerate")
    if how != "parallel":
        raise ValueError(f"model: local site {name!r} is discrete ({type(fn).__name__}) and not marked for "
                         "enumeration; sum it out with infer={'enumerate': 'parallel'} on its pyro.sample"
                         + (f" (it is marked {how!r}; only 'parallel' is supported)" if how else ""))
    if not getattr(fn, "has_enumerate_support", False):
        raise ValueError(f"model: local site {name!r} ({type(fn).__name__}) has no finite support to enumerate; "
                         "give it a bounded discrete distribution (Categorical, Bernoulli, Binomial, ...) or make "
                         "it continuous")
    return name


class _SummedOut(dist.TorchDistribution):
    """The observed site of a function whose discrete local sites are summed out: log p(x_n | u_n) (computed at the
    data, so ``log_prob`` ignores its value), and draws x̃ ~ p(x | u_n, c) with c ~ p(c | u_n, x_n)."""

    arg_constraints: dict = {}

    def __init__(self, log_lik: torch.Tensor, joint: torch.Tensor, batch_dims: int, observed: Any,
                 discrete: dict[str, torch.Tensor]) -> None:
        self.log_lik, self.joint, self.batch_dims, self.observed = log_lik, joint, batch_dims, observed
        self.discrete = discrete  # each discrete site's enumerated values, (*enum) left of the batch dims
        super().__init__(log_lik.shape, observed.event_shape, validate_args=False)

    @property
    def support(self) -> Any:
        return self.observed.support

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.log_lik

    def expand(self, batch_shape: Any, _instance: Any = None) -> _SummedOut:
        return _SummedOut(self.log_lik.expand(batch_shape), self.joint, self.batch_dims, self.observed, self.discrete)

    def sample(self, sample_shape: Any = ()) -> torch.Tensor:
        if tuple(sample_shape):
            raise NotImplementedError("a summed-out likelihood draws one x per batch element (sample_shape=())")
        return self.sample_with_sites()[0]

    def _enum_and_batch(self, shape: torch.Size) -> tuple[torch.Size, torch.Size]:
        """``shape`` split into its enumeration dims and its batch dims (the rightmost ``batch_dims``)."""
        cut = max(0, len(shape) - self.batch_dims)
        return shape[:cut], shape[cut:]

    def sample_with_sites(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One draw x̃ (*batch, *event) and the discrete sites' values it was drawn at, c ~ p(c | u, x) (*batch)."""
        with torch.no_grad():
            x = self.observed.sample()  # every value of the enumerated sites: (*enum, *batch, *event)
            event = x.shape[x.dim() - len(self.observed.event_shape):]
            x_enum, x_batch = self._enum_and_batch(x.shape[:x.dim() - len(event)])
            joint_enum, joint_batch = self._enum_and_batch(self.joint.shape)
            batch = torch.broadcast_shapes(self.batch_shape, joint_batch, x_batch)
            enum = torch.broadcast_shapes(joint_enum, x_enum)
            joint = self.joint.expand(enum + batch).reshape((-1,) + batch)  # (E, *batch)
            pick = dist.Categorical(logits=joint.movedim(0, -1)).sample()  # c ~ p(c | u, x): (*batch)
            x = x.expand(enum + batch + event).reshape((-1,) + batch + event)
            index = pick.reshape((1,) + batch + (1,) * len(event)).expand((1,) + x.shape[1:])
            sites = {name: v.reshape(v.shape[:v.dim() - self.batch_dims]).expand(enum).reshape(-1)[pick]
                     for name, v in self.discrete.items()}
            return x.gather(0, index).squeeze(0), sites


@register_model("function")
class FunctionModel(LatentModel):
    """A Pyro model function wrapped by :func:`wrap_model` (see :mod:`pyro_lvm.wrap` for the rules)."""

    Config = FunctionConfig
    local_site = UNCONSTRAINED_SITE

    def __init__(self, config: FunctionConfig, fn: Any = None, log_likelihood_fn: Any = None) -> None:
        super().__init__()
        self.config = config
        if fn is None:
            fn = import_target(config.target)
            if isinstance(fn, type) and issubclass(fn, nn.Module):
                # a PyroModule is stored by its class (built for the data's width where it takes ``data_dim``); its
                # weights come from the state dict
                takes_width = "data_dim" in inspect.signature(fn).parameters
                fn = fn(data_dim=config.data_dim) if takes_width else fn()
        if isinstance(fn, nn.Module):
            self.net = fn  # a PyroModule's weights are the model's
            self._fn = (fn,)
        elif callable(fn):
            self._fn = (fn,)
        else:
            raise ValueError(f"fn: expected a Pyro model function or a PyroModule, got {type(fn).__name__}")
        self.unconstrained = nn.ParameterDict()
        self.constraints_: dict[str, Any] = {}
        self.data_dim = config.data_dim
        local_state(self)  # its PyroModule's parameters kept local whenever the function runs (_ParamStore)
        self.sites, self.global_sites, self.observed_support = self._read_structure()
        self.__dict__["_log_likelihood"] = None
        if config.log_likelihood:
            if self.global_sites:
                raise ValueError(f"log_likelihood: with global latent sites ({', '.join(self.global_sites)}) log p(x) "
                                 "integrates over θ and has no per-point closed form here; leave it out")
            self.__dict__["_log_likelihood"] = log_likelihood_fn or import_target(config.log_likelihood)
        self.latent_dim = sum(s.size for s in self.sites.values())
        if config.encoder_input == "auto":
            counts = self.observed_support is not None and _is_discrete_count(self.observed_support)
            self.encoder_input_name = "log1p" if counts else "identity"
        else:
            self.encoder_input_name = config.encoder_input

    @property
    def fn(self) -> Any:
        return self._fn[0]

    @property
    def label(self) -> str:
        return self.config.label or self.config.target.rpartition(":")[2]

    def parameters_constrained(self) -> dict[str, torch.Tensor]:
        """The function's ``pyro.param`` values, in their constrained spaces, by name."""
        store, cons = self._modules["unconstrained"], self.__dict__["constraints_"]
        return {k: biject_to(cons[k])(v) for k, v in store.items()}

    def set_parameters(self, **values: object) -> None:
        """Set ``pyro.param`` values by name (in their constrained spaces), e.g. ``set_parameters(W=W0)``."""
        store, cons = self._modules["unconstrained"], self.__dict__["constraints_"]
        for k, v in values.items():
            if k not in store:
                raise ValueError(f"{k}: not a parameter of {self.label} (it has {', '.join(store)})")
            v = torch.as_tensor(v, dtype=self.dtype, device=self.device)
            shape = biject_to(cons[k])(store[k]).shape  # its constrained shape (a simplex's has one more entry)
            if v.shape != shape:
                raise ValueError(f"{k}: expected shape {tuple(shape)}, got {tuple(v.shape)}")
            with torch.no_grad():
                store[k].copy_(biject_to(cons[k]).inv(v))

    @classmethod
    def traits_for(cls, config: object) -> ModelTraits:
        """Before the function is traced (no data yet) its global sites are unknown: ``structure_known`` is off,
        so guides are checked in full once the model is built (:attr:`traits`)."""
        # Trace_ELBO and TraceGraph_ELBO: the reparametrized sites carry no KL of their own to look up
        return ModelTraits(cls.name, cls.local_site, (), None, False, "trace", ("trace", "tracegraph"),
                           "a wrapped function's sites are scored through their log-dets; no analytic KL",
                           structure_known=False)

    @property
    def traits(self) -> ModelTraits:
        return dataclasses.replace(type(self).traits_for(self.config), global_sites=self.global_sites,
                                   structure_known=True)

    # ---------------------------------------------------------------- structure
    def _read_structure(self) -> tuple[dict[str, LocalSite], tuple[str, ...], Any]:
        """The local latent sites, the global latent sites and the observed site's support, from a prototype trace
        on a few points."""
        n = PROTOTYPE_POINTS
        x = torch.zeros(n, self.data_dim)
        with torch.random.fork_rng(devices=[]), _ParamStore(self), _PlaceholderValues():
            try:
                tr = poutine.trace(self.fn).get_trace(x)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                raise ValueError(f"model: the function fails on a prototype batch of {n} points of {self.data_dim} "
                                 f"features ({' '.join(str(e).split())[:200]}); it must take the data (points × "
                                 "features) as its first argument") from None
        samples = [s for s in tr.nodes.values() if s["type"] == "sample" and type(s["fn"]).__name__ != "_Subsample"]
        if not any(in_data_plate(s) for s in samples):
            names = ", ".join(repr(s["name"]) for s in samples) or "none"
            raise ValueError(f"model: no site is inside pyro.plate({DATA_PLATE!r}, len(x)) (sites: {names}); put the "
                             f"per-point sites, site {samples[0]['name']!r} first, inside it" if samples else
                             f"model: the function samples no site; it must score the data inside "
                             f"pyro.plate({DATA_PLATE!r}, len(x))")
        sites: dict[str, LocalSite] = {}
        global_sites: list[str] = []
        discrete: list[str] = []
        observed_support, offset = None, 0
        self.max_plate_nesting = max([1] + [-f.dim for site in tr.nodes.values() if site["type"] == "sample"
                                            for f in site["cond_indep_stack"] if f.dim is not None])
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
                continue
            plates = {f.name: f for f in site["cond_indep_stack"]}
            frame = plates.get(DATA_PLATE)
            if frame is None and site["is_observed"]:
                raise ValueError(f"model: observed site {name!r} is outside pyro.plate({DATA_PLATE!r}, len(x)); the "
                                 "data are scored per point, inside it")
            if frame is None:
                global_sites.append(_global_site(name, site["fn"]))
                continue
            if frame.dim != -1:
                raise ValueError(f"model: site {name!r} is in plate {DATA_PLATE!r} at dim {frame.dim}; the data "
                                 "plate must be at dim -1 (pyro.plate('data', len(x)) with no other plate inside)")
            if len(plates) > 1:
                others = ", ".join(sorted(k for k in plates if k != DATA_PLATE))
                raise ValueError(f"model: site {name!r} is also in plate(s) {others}; local sites under a further "
                                 "plate are not supported yet")
            fn = site["fn"]
            if site["is_observed"]:
                if observed_support is not None:
                    raise ValueError(f"model: observed sites {self.observed_site!r} and {name!r}; wrap_model "
                                     "takes one observed site, the data x")
                observed_support, self.observed_site = fn.support, name
                continue
            if tuple(fn.batch_shape) != (n,):
                raise ValueError(f"model: local site {name!r} has batch shape {tuple(fn.batch_shape)} on {n} points; "
                                 "it must be exactly (points,): move per-point dims into the event with .to_event()")
            if _is_discrete(fn):
                discrete.append(_discrete_local_site(name, site))
                continue
            try:
                transform = biject_to(fn.support)
            except NotImplementedError:
                raise ValueError(f"model: local site {name!r} has support {fn.support}, which has no bijection "
                                 "from real space (torch.distributions.biject_to)") from None
            event = tuple(fn.event_shape)
            unconstrained = tuple(transform.inv.forward_shape(event)) if event else ()
            sites[name] = LocalSite(name, event, unconstrained, offset, fn.support)
            offset += sites[name].size
        if observed_support is None:
            raise ValueError("model: the function has no observed site; it must score the data, "
                             "pyro.sample('x', ..., obs=x)")
        if not sites:
            what = (f"only the discrete site(s) {', '.join(map(repr, discrete))}, summed out" if discrete else
                    "no local latent site")
            raise ValueError(f"model: the function has {what} inside pyro.plate('data', len(x)); there is nothing "
                             "for an amortized guide to infer (a model whose only per-point latent is discrete has "
                             "its exact posterior: fit its parameters by maximum likelihood)")
        self.discrete_sites = tuple(discrete)
        if discrete:  # the enumerated run, once, on the prototype: a function that cannot broadcast fails here
            self.sites = sites
            with torch.random.fork_rng(devices=[]), _ParamStore(self):
                try:
                    self._enumerated(x, torch.zeros(n, sum(s.size for s in sites.values())))
                except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
                    raise ValueError(f"model: the function fails with its discrete site(s) "
                                     f"{', '.join(map(repr, discrete))} enumerated ({' '.join(str(e).split())[:160]}); "
                                     "it must broadcast over a leading enumeration dim: index parameters with "
                                     "pyro.ops.indexing.Vindex(p)[..., c, :] rather than p[c]") from None
        if global_sites:  # a global whose shape follows the number of points is a per-point site outside the plate
            with torch.random.fork_rng(devices=[]), _ParamStore(self):
                other = poutine.trace(self.fn).get_trace(torch.zeros(n + 1, self.data_dim))
            for name in global_sites:
                a, b = tr.nodes[name]["value"].shape, other.nodes[name]["value"].shape
                if a != b:
                    raise ValueError(f"model: site {name!r} is outside pyro.plate({DATA_PLATE!r}, len(x)) but its "
                                     f"shape follows the points ({tuple(a)} on {n} points, {tuple(b)} on {n + 1}); "
                                     "a per-point site goes inside the data plate")
        return sites, tuple(global_sites), observed_support

    # ---------------------------------------------------------------- the model
    def validate(self, x: object, name: str = "data") -> torch.Tensor:
        """The base checks, plus every value inside the observed site's support (counts must be raw counts)."""
        x = super().validate(x, name)
        support = self.observed_support
        base = support.base_constraint if isinstance(support, constraints.independent) else support
        for start, rows in row_blocks(x):  # streamed data: block by block
            ok = base.check(rows)
            if bool(ok.all()):
                continue
            r, c = (int(i) for i in (~ok).nonzero()[0])
            raise ValueError(f"{name}: row {start + r}, column {c} holds {float(rows[r, c]):g}, outside the support "
                             f"of the observed site {self.observed_site!r} ({base}); pass the raw values "
                             "(--no-standardize, or from_array(..., standardize=False))")
        return x

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return ENCODER_INPUTS[self.encoder_input_name](x)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor | None:
        """The exact log p(x) per point where the user gave one at wrap time (``log_likelihood=``), else ``None``."""
        fn = self.__dict__.get("_log_likelihood")
        if fn is None:
            return None
        value = torch.as_tensor(fn(x, **self.parameters_constrained()))
        if value.shape != (x.shape[0],):
            raise ValueError(f"log_likelihood: {self.config.log_likelihood} returned shape {tuple(value.shape)} for "
                             f"{x.shape[0]} points; it must return one log p(x_n) per point, shape (N,)")
        return value

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        n = x.shape[0]
        with data_plate(n, total_size, x.device):
            u = pyro.sample(UNCONSTRAINED_SITE, dist.ImproperUniform(constraints.real, (n,), (self.latent_dim,)))
        self._run(x, u, 1.0 if total_size is None else float(total_size) / n)

    def _run(self, x: torch.Tensor, u: torch.Tensor, scale: float) -> None:
        # the function's own data plate records a subsample site named "data", as the plate above does: hidden
        hide = poutine.block(hide_fn=_is_plate_site)
        if self.discrete_sites:
            prior, likelihood = self._enumerated(x, u)
            with hide, _ScalePerPoint(scale), pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
                pyro.sample(DISCRETE_PRIOR_SITE, dist.Unit(prior), obs=prior.new_empty(prior.shape + (0,)),
                            infer={"pyro_lvm_local": True})
                pyro.sample(self.observed_site, likelihood, obs=x)
            return
        # minibatches are rescaled to the full data set (the library's job): the per-point sites only, never a
        # global prior
        with hide, _ScalePerPoint(scale), _ParamStore(self), _WriteBack(self.sites, u):
            self.fn(x)

    def _enumerated(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, _SummedOut]:
        """The function run with its discrete local sites enumerated (its per-point sites hidden from the handlers
        outside; its global sites not, so a guide's draws of θ reach it): log p(u_n) with c summed out, and the
        observed site's density log p(x_n | u_n) = log Σ_c p(x_n, u_n, c) − log p(u_n) with its sampler."""
        # every enumeration dim left of the batch dims: the points, the plates, a particle plate (S draws per point)
        batch_dims = max(u.dim() - 1, self.max_plate_nesting + 1)
        per_point = poutine.block(hide_fn=lambda m: in_data_plate(m) or _is_plate_site(m))
        with per_point, _ParamStore(self), _WriteBack(self.sites, u):
            tr = poutine.trace(poutine.enum(self.fn, first_available_dim=-1 - batch_dims)).get_trace(x)
        joint = prior = x.new_zeros(())
        observed = None
        discrete = {}
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or not in_data_plate(site) or _is_plate_site(site):
                continue
            if name in self.discrete_sites:
                discrete[name] = site["value"]
            lp = site["fn"].log_prob(site["value"]) * site["scale"]
            mask = site["mask"]  # poutine.mask: False (or False entries) drop the term
            if isinstance(mask, torch.Tensor):
                lp = lp.masked_fill(~mask, 0.0)
            elif mask is False:
                lp = lp * 0.0
            joint = joint + lp
            if site["is_observed"] and not site["infer"].get("pyro_lvm_local", False):
                observed = site
            else:
                prior = prior + lp

        def total(t: torch.Tensor) -> torch.Tensor:  # log Σ over the enumeration dims (those left of the batch)
            extra = t.dim() - batch_dims
            return t.logsumexp(tuple(range(extra))) if extra > 0 else t

        prior_sum = total(prior)
        return prior_sum, _SummedOut(total(joint) - prior_sum, joint, batch_dims, observed["fn"],  # type: ignore[index]
                                     discrete)

    def globals_model(self, x: torch.Tensor, total_size: int | None = None) -> None:
        """The function with its per-point latents held at u = 0: what an autoguide over the global latent sites
        runs (its prototype trace and its priors; the per-point sites are hidden from it)."""
        u = x.new_zeros(x.shape[0], self.latent_dim)
        self._run(x, u, 1.0)

    @property
    def data_loc(self) -> torch.Tensor:
        """A stand-in point (zeros) for guides that build their parameters on a prototype call."""
        return torch.zeros(self.data_dim, dtype=self.dtype, device=self.device)

    def unpack(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each local site's values, in its own support and event shape, from unconstrained vectors u (..., k)."""
        out = {}
        for s in self.sites.values():
            part = u[..., s.offset:s.offset + s.size].reshape(u.shape[:-1] + s.unconstrained_shape)
            out[s.name] = biject_to(s.support)(part)
        return out

    def unpack_draws(self, u: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        """ArviZ's view of draws u (S, N, k): each local site under its own name and support, (S, N, *event),
        with its event dims named ``<site>_dim_<i>``."""
        values = self.unpack(torch.from_numpy(u))
        return ({k: v.numpy() for k, v in values.items()},
                {k: ["point", *(f"{k}_dim_{i}" for i in range(len(s.event_shape)))] for k, s in self.sites.items()})

    def bind_guide(self, guide: object) -> None:
        guide = getattr(guide, "_modules", {}).get("local", guide)  # a LOCAL+GLOBAL pair: its local half encodes
        encoder = getattr(guide, "encoder", None)
        if isinstance(encoder, nn.Module) and not isinstance(encoder, _InputTransformed):
            guide.encoder = _InputTransformed(encoder, self.encoder_input_name)  # type: ignore[attr-defined]

    def _sample(self, n: int, *, mean: bool, guide: object) -> torch.Tensor:
        x = torch.zeros(n, self.data_dim, dtype=self.dtype, device=self.device)
        fn = poutine.uncondition(self.fn)
        if self.global_sites:  # the globals at the fitted guide's point estimate, as the built-in mixture does
            fn = poutine.condition(fn, data=self._globals_to_sample_from(guide, self.label))
        with _ParamStore(self):
            tr = poutine.trace(fn).get_trace(x)
        site = tr.nodes[self.observed_site]
        value = site["fn"].mean if mean else site["value"]
        return value.reshape(n, self.data_dim)

    @classmethod
    def example(cls, seed: int = 0) -> tuple[LatentModel, torch.Tensor]:
        from pyro_lvm.models import functions

        g = torch.Generator().manual_seed(seed)
        x = torch.poisson(3.0 * torch.rand(24, 5, generator=g))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = wrap_model(functions.poisson_pca, data_dim=5)
        return model, x


def _is_discrete_count(support: Any) -> bool:
    """Counts (non-negative integers, or integers from 0 up to a bound), not 0/1 outcomes."""
    if isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is constraints.boolean:
        return False
    lower = getattr(support, "lower_bound", None)
    upper = getattr(support, "upper_bound", None)
    return getattr(support, "is_discrete", False) and lower == 0 and (upper is None or not (
        isinstance(upper, int | float) and upper <= 1))


class _InputTransformed(nn.Module):
    """An encoder that sees ``encoder_input(x)``: the named transform, then the network (its ``output_dim`` kept)."""

    def __init__(self, net: nn.Module, transform: str) -> None:
        super().__init__()
        self.net, self.transform = net, transform
        self.output_dim = getattr(net, "output_dim", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(ENCODER_INPUTS[self.transform](x))


#: the model each guide built by ``build_guide(spec, fn, data_dim=D)`` for a bare function was wrapped into, held as
#: long as the guide lives (the guide never holds its model): fit, evaluate, save, ... given that function and that
#: guide find it here. One wrapped model per guide, so guides built for one function never share its parameters.
_AUTO_WRAPPED: weakref.WeakKeyDictionary[Any, FunctionModel] = weakref.WeakKeyDictionary()


def _label(fn: object) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _suite_model(model: object, what: str) -> LatentModel | None:
    """``model`` when it is a suite model, ``None`` when it is a bare Pyro function (or ``PyroModule``) to be wrapped,
    and a ``ValueError`` naming ``what`` for anything else."""
    if isinstance(model, LatentModel):
        return model
    if callable(model):
        return None
    raise ValueError(f"{what}: expected a model built by build_model or wrap_model, got {type(model).__name__}")


def wrap_for_guide(model: object, data_dim: int | None, what: str = "model") -> LatentModel:
    """``build_guide``'s model: ``model`` itself when it is a suite model; a bare Pyro function (or a ``PyroModule``
    class) wrapped afresh (:func:`wrap_model` with its defaults), which needs ``data_dim``. A ``PyroModule``
    instance is refused: every guide would train its one set of weights."""
    suite = _suite_model(model, what)
    if suite is not None:
        return suite
    if isinstance(model, nn.Module):
        raise ValueError(f"{what}: {type(model).__name__} is a PyroModule instance, whose weights every guide built "
                         "from it would share; wrap it once, model = pyro_lvm.wrap_model(net, data_dim=D), and "
                         "build each guide for that model (or pass the class, which is built afresh for each guide)")
    if data_dim is None:
        raise ValueError(f"data_dim: {_label(model)} is a plain Pyro model function, and its guide needs the "
                         "data's width: build_guide(spec, fn, data_dim=D), or wrap it first: model = "
                         "pyro_lvm.wrap_model(fn, data_dim=D)")
    wrapped = wrap_model(model, data_dim=data_dim)
    wrapped.__dict__["_wrapped_from"] = model  # what fit, evaluate, ... will be given: the function or the class
    return wrapped


def remember_wrapped(guide: Any, model: LatentModel) -> None:
    """Record that ``guide`` was built for ``model`` (a wrapped function, by :func:`wrap_for_guide` or by the
    caller's ``wrap_model``), so that calls given the function and this guide find the model."""
    if isinstance(model, FunctionModel):
        _AUTO_WRAPPED[guide] = model


def model_for(model: object, guide: Any, what: str = "model") -> LatentModel:
    """The suite model to use with ``guide``: ``model`` itself when it is one; for a bare Pyro function, the model
    that ``build_guide(spec, fn, data_dim=D)`` wrapped it into for this guide. Otherwise a ``ValueError`` naming
    ``what`` with the fix (a guide built elsewhere, e.g. Pyro's ``AutoNormal(fn)``, is not amortized and cannot
    score held-out points)."""
    suite = _suite_model(model, what)
    if suite is not None:
        return suite
    try:
        wrapped = _AUTO_WRAPPED.get(guide)
    except TypeError:  # an unhashable guide: not one of ours
        wrapped = None
    if wrapped is None:
        if getattr(guide, "__dict__", {}).get("model_token") is not None:  # built by build_guide, then copied
            raise ValueError(f"{what}: this guide was built by pyro_lvm.build_guide, but a copy of a guide (deepcopy, "
                             "unpickled) loses the link to the model its function was wrapped into; pass that model "
                             "instead of the function (pyro_lvm.wrap_model, or a loaded fit's .model)")
        raise ValueError(f"{what}: {_label(model)} is a plain Pyro model function and this guide "
                         f"({type(guide).__name__}) was not built for it by pyro_lvm.build_guide; build it with "
                         "guide = pyro_lvm.build_guide(spec, fn, data_dim=D), or wrap the function first: model = "
                         "pyro_lvm.wrap_model(fn, data_dim=D)")
    source = wrapped.__dict__.get("_wrapped_from")
    if model is not source and model is not wrapped.fn and getattr(wrapped, "net", None) is not model:
        was = source if source is not None else wrapped.fn
        if _label(was) == _label(model):
            raise ValueError(f"{what}: the guide was built for another {_label(model)} than this one (the function "
                             "was defined again, e.g. a notebook cell run twice, or reloaded); build the guide again "
                             "for this one with build_guide(spec, fn, data_dim=D)")
        raise ValueError(f"{what}: the guide was built for the function {_label(was)}, not "
                         f"{_label(model)}; build a guide for this one with build_guide(spec, fn, data_dim=D)")
    return wrapped


def wrap_model(fn: Any, *, data_dim: int, name: str | None = None, encoder_input: str = "auto",
               target: str | None = None, log_likelihood: Any = None) -> FunctionModel:
    """A model the suite accepts (``build_guide``, ``fit``, ``evaluate``, ``save``/``load``, ``sample``) from a
    plain Pyro model function ``fn(x)`` or a ``PyroModule``; its rules are in :mod:`pyro_lvm.wrap`.

    ``data_dim`` is the number of features; ``name`` labels results (default: the function's name);
    ``encoder_input`` names the transform of x before every encoder ("auto": log1p for count likelihoods);
    ``target`` is the import path :func:`pyro_lvm.load` imports the function from (default: where ``fn`` is
    defined). ``log_likelihood`` (a function ``log_likelihood(x, **params) -> (N,)``, given the function's
    ``pyro.param`` values by name, or its import path) is the exact log p(x) per point where the model has one:
    ``evaluate`` then reports it and the gaps to it, and ``inference_gaps`` splits them; it is stored by its import
    path, as the function is. A function that breaks a rule raises ``ValueError`` naming the site and the rule,
    before any data are loaded or any guide is built.
    """
    if isinstance(fn, LatentModel):
        return fn  # type: ignore[return-value]
    if isinstance(fn, type) and issubclass(fn, nn.Module):  # a PyroModule class: built as load rebuilds it
        if not issubclass(fn, PyroModule):
            raise ValueError("fn: a torch module must be a PyroModule (pyro.nn.PyroModule) to be a Pyro model")
        target = target or target_of(fn)
        fn = fn(data_dim=int(data_dim)) if "data_dim" in inspect.signature(fn).parameters else fn()
    if not callable(fn):
        raise ValueError(f"fn: expected a Pyro model function or a PyroModule, got {type(fn).__name__}")
    if isinstance(fn, nn.Module) and not isinstance(fn, PyroModule):
        raise ValueError("fn: a torch module must be a PyroModule (pyro.nn.PyroModule) to be a Pyro model")
    ll_target, ll_fn = "", None
    if log_likelihood is not None:
        ll_fn = import_target(log_likelihood) if isinstance(log_likelihood, str) else log_likelihood
        if not callable(ll_fn):
            raise ValueError(f"log_likelihood: expected a function or an import path, got {type(ll_fn).__name__}")
        ll_target = log_likelihood if isinstance(log_likelihood, str) else target_of(ll_fn)
    cfg = FunctionConfig(data_dim=int(data_dim), target=target or target_of(fn), encoder_input=encoder_input,
                         label=name or "", log_likelihood=ll_target)
    return FunctionModel(cfg, fn=fn, log_likelihood_fn=ll_fn)


assert MODELS["function"] is FunctionModel
