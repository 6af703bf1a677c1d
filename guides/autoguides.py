r"""Non-amortized guides for a model's global latents, plus an amortized q(c|x) for discrete locals.

Each family is a Pyro autoguide factory registered by name; the guide covers the model's
``global_sites`` (the rest of the model is hidden from it) and, where the model declares a
``local_discrete_site`` that must be proposed, adds :class:`AmortizedCategorical`:

=============  ===================================================================================
``map``        AutoDelta: point masses, so the ELBO is log p(x, θ) and its maximiser is the MAP
``meanfield``  AutoNormal: independent Gaussians in the unconstrained space
``fullrank``   AutoMultivariateNormal: one Gaussian with a full covariance over all globals
``lowrank:R``  AutoLowRankMultivariateNormal with rank R
``auto-iaf:K`` :class:`AutoFlowNormal`: K inverse autoregressive layers on top of a diagonal Gaussian
=============  ===================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from pyro.distributions import Distribution
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import biject_to

from pyro_lvm.models.base import LatentModel, ModelTraits, data_plate
from pyro_lvm.nn import encoder_network
from pyro_lvm.runtime import local_params
from pyro_lvm.saving import materialize

from .config import GuideConfig
from .flows import reversal
from .registry import register_guide

#: factory(model_without_locals, init_loc_fn, config, arg) -> an autoguide over the global sites
AutoGuideFactory = Callable[[Callable[..., Any], Callable[..., Any], GuideConfig, int | None], autoguide.AutoGuide]


class AutoFlowNormal(autoguide.AutoDiagonalNormal):
    r"""θ = loc + scale ⊙ f_K ∘ … ∘ f_1(ε), ε ~ N(0, I), with f_k inverse autoregressive (Kingma et al. 2016).

    Unlike Pyro's ``AutoIAFNormal`` (whose base is a fixed N(0, I)), the affine part starts at the
    model's initial values (``init_loc_fn``), so a data-driven initialisation survives.
    """

    def __init__(self, model: Callable[..., Any], num_transforms: int = 2, hidden: tuple[int, ...] = (64,),
                 init_loc_fn: Callable[..., Any] = init_to_median, init_scale: float = 0.1) -> None:
        self._num_transforms, self._hidden = num_transforms, hidden
        super().__init__(model, init_loc_fn=init_loc_fn, init_scale=init_scale)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        d = self.latent_dim
        hidden = [max(h, d) for h in self._hidden]  # an autoregressive net needs width >= its input
        n = self._num_transforms if d > 1 else 0  # one dimension: the affine part is all there is
        # made when the prototype is (the first call): on the device and in the dtype of loc, which come from the model
        self.iafs = nn.ModuleList(T.affine_autoregressive(d, hidden, stable=True) for _ in range(n)).to(self.loc)

    def transforms(self) -> list[torch.distributions.Transform]:
        """IAF layers, the coordinate order reversed between them, then θ = loc + scale ⊙ ·."""
        out: list[torch.distributions.Transform] = []
        for i, t in enumerate(self.iafs):
            out += [reversal(), t] if i > 0 else [t]  # a cached Reverse per position, as in the local flows
        # cached: log q(θ) of the guide's own draw reads each layer's input from its cache instead of inverting the
        # IAF one coordinate at a time (d sequential passes: ~8x the cost of an epoch without it)
        return out + [T.AffineTransform(self.loc, self.scale, cache_size=1)]

    def get_posterior(self, *args: Any, **kwargs: Any) -> Distribution:
        base = dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)
        return dist.TransformedDistribution(base, self.transforms())

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The image of the base's median (0) through the flow: a point estimate of each global."""
        z = torch.zeros_like(self.loc)
        for t in self.transforms():
            z = t(z)
        return {site["name"]: biject_to(site["fn"].support)(u) for site, u in self._unpack_latent(z)}


class AmortizedCategorical(PyroModule):
    """q(c_n | x_n) = Categorical(softmax(g_φ(x_n))), with a per-point neural baseline b_ψ(x_n).

    The baseline is handed to ``TraceGraph_ELBO``, which subtracts it from the score-function term's
    downstream cost (Mnih & Gregor 2014) and fits it by least squares; other estimators ignore it.
    """

    def __init__(self, site: str, data_dim: int, num_categories: int, config: GuideConfig) -> None:
        super().__init__()
        self.site = site
        # the guide config's architecture, as for the amortized Gaussian guides (mlp: the MLP Encoder, as before)
        self.encoder = encoder_network(config.architecture, data_dim, config.hidden, config.activation)
        self.logits = nn.Linear(self.encoder.output_dim, num_categories)
        features = encoder_network(config.architecture, data_dim, config.hidden, config.activation)
        self.baseline = nn.Sequential(features, nn.Linear(features.output_dim, 1))

    def distribution(self, x: torch.Tensor) -> dist.Categorical:
        return dist.Categorical(logits=self.logits(self.encoder(x)))

    def fit_to(self, x: torch.Tensor, probs: torch.Tensor, steps: int = 300, lr: float = 1e-2) -> float:
        """Fit q(c|x) to target probabilities by cross-entropy (e.g. the E-step of an initialisation)."""
        params = list(self.encoder.parameters()) + list(self.logits.parameters())
        optim = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            loss = -(probs * torch.log_softmax(self.logits(self.encoder(x)), -1)).sum(-1).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
        return loss.item()

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        baseline = {"nn_baseline": lambda v: self.baseline(v).squeeze(-1), "nn_baseline_input": x}
        with data_plate(x.shape[0], total_size, x.device):
            pyro.sample(self.site, self.distribution(x), infer={"baseline": baseline})


class InitToModelValues:
    """An autoguide's ``init_loc_fn``: a site starts at ``model.initial_values[site]`` where the model has one, else
    at its prior median. The values are read when the autoguide builds its parameters (its first call), not when
    it is made, so they are then on the model's device and in its dtype (they move with it), and so are the
    parameters made from them."""

    def __init__(self, model: LatentModel) -> None:
        self._model = (model,)  # not a submodule

    def __call__(self, site: dict[str, Any]) -> torch.Tensor:
        values = getattr(self._model[0], "initial_values", None) or {}
        return values[site["name"]] if site["name"] in values else init_to_median(site)


class GlobalGuide(PyroModule):
    """An autoguide over ``model.global_sites`` and, if the model asks for one, a q(c|x) for its discrete local.

    The autoguide sees the model with every other site hidden; it starts at ``model.initial_values``
    where the model provides them (e.g. k-means++ seeds), else at the prior median.
    """

    def __init__(self, model: LatentModel, factory: AutoGuideFactory, config: GuideConfig, arg: int | None) -> None:
        super().__init__()
        self._model = (model,)  # not a submodule: the model's state is not the guide's
        # the model's globals alone: ``model.globals_model`` where a model offers one (a wrapped function, whose
        # local vector has no proper prior to sample from), else the model with every other site hidden
        source = getattr(model, "globals_model", None) or model
        self.globals = factory(poutine.block(source, expose=list(model.global_sites)), InitToModelValues(model),
                               config, arg)
        self.assignments = (AmortizedCategorical(model.local_discrete_site, model.data_dim, model.latent_dim, config)
                            if model.local_discrete_site else None)

    def init_from_data(self, x: torch.Tensor, max_points: int = 5000) -> None:
        """Start q(c|x) at the model's initial responsibilities p(c|x, θ₀): the E-step of the initialisation.

        Without it a fresh q(c|x) is near uniform, so every component is first pulled toward the data
        mean and the seeding is lost. :func:`experiments.train.fit` calls this hook before optimising.
        """
        model, values = self._model[0], getattr(self._model[0], "initial_values", None)
        if self.assignments is None or not values or not hasattr(model, "responsibilities"):
            return
        x = x[:max_points]
        with torch.no_grad():
            probs = model.responsibilities(x, values)
        self.assignments.fit_to(x, probs)

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> dict[str, torch.Tensor]:
        theta = self.globals(x, total_size)
        if self.assignments is not None:
            self.assignments(x, total_size)
        return theta

    @torch.no_grad()
    def sample_globals(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One draw θ ~ q(θ) of every global (constrained values)."""
        with local_params(self, self._model[0]):
            return {k: v.detach() for k, v in self.globals(x).items()}

    @torch.no_grad()
    def point_estimate(self, x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """θ̂: the MAP point for ``map``, the image of the base median for the others (``x`` is not used
        beyond building the guide's parameters on first use)."""
        model = self._model[0]
        x = model.data_loc.unsqueeze(0) if x is None else x
        if getattr(self.globals, "prototype_trace", None) is None:
            materialize(model, self)  # builds the parameters without taking the caller's random draws
        with local_params(self, model):
            return {k: v.detach() for k, v in self.globals.median(x).items()}

    def posterior(self, x: object) -> dist.Categorical:
        """The assignment posterior for new points: q(c|x) where it is amortized, else p(c | x, θ̂)."""
        model = self._model[0]
        x = model.validate(x, name="x")
        with local_params(self, model), torch.no_grad():
            if self.assignments is not None:
                return self.assignments.distribution(x)
            return dist.Categorical(probs=model.responsibilities(x, self.point_estimate(x)))

    def encode(self, x: object) -> torch.Tensor:
        """Responsibilities per point, shape (N, K) (rows sum to 1)."""
        return self.posterior(x).probs

    @property
    def is_point_mass(self) -> bool:
        return isinstance(self.globals, autoguide.AutoDelta)


def has_global_latents(traits: ModelTraits) -> str | None:
    if not traits.global_sites:
        return f"{traits.name} has no global latent sites (its globals are point-estimated parameters)"
    return None


def _register(name: str, factory: AutoGuideFactory, summary: str, arg_name: str | None = None,
              default_arg: int | None = None) -> None:
    def build(model: LatentModel, config: GuideConfig, arg: int | None) -> GlobalGuide:
        return GlobalGuide(model, factory, config, arg)

    build.__name__ = name.replace("-", "_")
    register_guide(name, requires=has_global_latents, arg_name=arg_name, default_arg=default_arg,
                   summary=summary)(build)


_register("map", lambda m, init, c, k: autoguide.AutoDelta(m, init_loc_fn=init),
          "AutoDelta over the globals: MAP point estimates")
_register("meanfield", lambda m, init, c, k: autoguide.AutoNormal(m, init_loc_fn=init, init_scale=c.init_scale),
          "AutoNormal over the globals: independent Gaussians (unconstrained space)")
_register("fullrank", lambda m, init, c, k: autoguide.AutoMultivariateNormal(m, init_loc_fn=init,
                                                                             init_scale=c.init_scale),
          "AutoMultivariateNormal over the globals: one full-covariance Gaussian")
_register("lowrank", lambda m, init, c, k: autoguide.AutoLowRankMultivariateNormal(
    m, init_loc_fn=init, init_scale=c.init_scale, rank=k), "AutoLowRankMultivariateNormal over the globals",
          arg_name="R (rank)", default_arg=None)
_register("auto-iaf", lambda m, init, c, k: AutoFlowNormal(m, num_transforms=k or 2, hidden=tuple(c.flow_hidden),
                                                           init_loc_fn=init, init_scale=c.init_scale),
          "inverse autoregressive flow over the globals (diagonal Gaussian + K IAF layers)",
          arg_name="K (number of transforms)", default_arg=2)

__all__ = ["AmortizedCategorical", "AutoFlowNormal", "GlobalGuide", "has_global_latents"]
