r"""Amortized normalizing-flow guides.

A diagonal Gaussian base from the encoder is pushed through K transforms whose parameters are
produced by hypernetworks from the encoder's hidden features h(x):

.. math::
    z_0 \sim \mathcal N(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2), \qquad
    z_K = f_K \circ \dots \circ f_1(z_0; h(x)),
    \qquad \log q_K(z_K \mid x) = \log q_0(z_0 \mid x)
        - \sum_{k=1}^K \log \left|\det \frac{\partial f_k}{\partial z_{k-1}}\right|

Each family is a registry entry (``planar:K``, ``radial:K``, ``iaf:K``, ``householder:K``, ``spline:K``):
a transform factory handed to :class:`AmortizedFlowGuide`, as Pyro's ``AutoIAFNormal`` is a factory handed
to ``AutoNormalizingFlow``, with the two halves of Pyro's ``.condition(h)``: the per-point parameters a
conditional transform computes from the context h, and the transform those parameters give. Per-point
inference (:func:`pyro_lvm.gaps.inference_gaps`) frees the former, one set per data point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions import Distribution
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms.householder import ConditionedHouseholder
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.radial import ConditionedRadial
from torch import nn
from torch.distributions import Transform

from pyro_lvm.models.base import LatentModel
from pyro_lvm.registry import Registry

from .amortized import DiagonalGaussianGuide
from .config import GuideConfig
from .registry import register_guide

#: factory(latent_dim, context_dim, hidden_dims) -> a (conditional) transform module
TransformFactory = Callable[[int, int, list[int]], nn.Module]
#: (transform module, context h (N, C)) -> its per-point parameters {name: (N, ...)}
LocalParameters = Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]
#: (transform module, per-point parameters) -> the transform they give (``module.condition(h)`` at h's parameters)
FromParameters = Callable[[nn.Module, dict[str, torch.Tensor]], Transform]


@dataclass(frozen=True)
class HypernetOutputs:
    """Per-point parameters of a transform whose hypernetwork ``module.nn`` maps h to a tuple of tensors (planar:
    b, u, w; radial: x₀, α', β'): the outputs themselves, named ``names``. Freed per point, they make the flow
    a per-point planar (radial) flow with no hypernetwork: the family the amortized one is a subset of. (A class,
    not a closure, so a guide holding it pickles.)"""

    names: tuple[str, ...]

    def __call__(self, module: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, module.nn(h), strict=True))


def _planar(module: nn.Module, p: dict[str, torch.Tensor]) -> Transform:
    return ConditionedPlanar((p["bias"], p["u"], p["w"]))  # what ConditionalPlanar.condition(h) builds


def _radial(module: nn.Module, p: dict[str, torch.Tensor]) -> Transform:
    return ConditionedRadial((p["x0"], p["alpha"], p["beta"]))


def _householder_vectors(module: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """``u``: the unnormalised reflection vectors (N, count, k), as ``ConditionalHouseholder.condition`` makes them."""
    out = module.nn(h)
    return {"u": out.unsqueeze(-2) if module.count_transforms == 1 else torch.stack(out, dim=-2)}


def _householder(module: nn.Module, p: dict[str, torch.Tensor]) -> Transform:
    return ConditionedHouseholder(p["u"])


def free_context(module: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autoregressive flows (IAF, splines): the per-point input is the context h (N, C) itself, fed to the
    conditional MADE with every point's own copy. Freed per point, the family is "this MADE conditioned on a free
    context": a subset of a fully free IAF (whose weights would be per point too), so the approximation gap it
    measures is an upper bound on that of the amortization-free family."""
    return {"context": h}


def _conditioned_on_context(module: nn.Module, p: dict[str, torch.Tensor]) -> Transform:
    return module.condition(p["context"])


@dataclass(frozen=True)
class FlowFamily:
    factory: TransformFactory
    #: reverse the coordinate order between layers (autoregressive flows)
    permute: bool
    default_k: int
    summary: str
    #: the per-point parameters one conditioned transform is built from (the first half of ``.condition(h)``)
    local_parameters: LocalParameters = free_context
    #: the transform built from them (the second half): ``from_parameters(m, local_parameters(m, h))`` is
    #: ``m.condition(h)``
    from_parameters: FromParameters = _conditioned_on_context


FLOWS: Registry[FlowFamily] = Registry("flow")


def _iaf(k: int, c: int, hidden: list[int]) -> nn.Module:
    # Kingma et al. (2016)'s numerically stable, sigmoid-gated update: z' = σ(s) z + (1 − σ(s)) m
    return T.conditional_affine_autoregressive(k, c, hidden, stable=True)


def _spline(k: int, c: int, hidden: list[int]) -> nn.Module:
    return T.conditional_spline_autoregressive(k, c, hidden, count_bins=8, bound=5.0)


FLOWS.register("planar")(FlowFamily(T.conditional_planar, False, 10, "planar flows (Rezende & Mohamed 2015)",
                                    HypernetOutputs(("bias", "u", "w")), _planar))
FLOWS.register("radial")(FlowFamily(T.conditional_radial, False, 10, "radial flows (Rezende & Mohamed 2015)",
                                    HypernetOutputs(("x0", "alpha", "beta")), _radial))
FLOWS.register("iaf")(FlowFamily(_iaf, True, 2, "inverse autoregressive flow (Kingma et al. 2016)"))
FLOWS.register("householder")(FlowFamily(lambda k, c, h: T.conditional_householder(k, c, h), False, 4,
                                         "Householder reflections: full-covariance Gaussian (Tomczak & Welling 2016)",
                                         _householder_vectors, _householder))
FLOWS.register("spline")(FlowFamily(_spline, True, 2, "autoregressive rational-quadratic splines (Durkan et al. 2019)"))


class AmortizedFlowGuide(DiagonalGaussianGuide):
    """q(z|x): the diagonal Gaussian of :class:`DiagonalGaussianGuide` pushed through conditioned transforms."""

    def __init__(self, model: LatentModel, config: GuideConfig, family: FlowFamily, num_transforms: int) -> None:
        super().__init__(model, config)
        context, hidden = self.encoder.output_dim, list(config.flow_hidden)
        if family.permute and any(h < self.latent_dim for h in hidden):
            raise ValueError(f"autoregressive flows need hidden sizes >= the latent dimension ({self.latent_dim}); "
                             f"got flow_hidden={tuple(hidden)}")
        # the family's two halves of .condition(h), for per-point inference (not the family: its factory may be
        # a lambda, which would keep the guide from pickling)
        self._local_parameters, self._from_parameters = family.local_parameters, family.from_parameters
        self.transforms = nn.ModuleList(family.factory(self.latent_dim, context, hidden) for _ in range(num_transforms))
        # reversing the order between autoregressive layers lets every coordinate depend on every other
        self.reverse = T.Permute(torch.arange(self.latent_dim - 1, -1, -1)) if family.permute else None

    def conditioned(self, h: torch.Tensor) -> list[TransformModule]:
        out: list[TransformModule] = []
        for i, t in enumerate(self.transforms):
            if self.reverse is not None and i > 0:
                out.append(self.reverse)
            out.append(t.condition(h) if isinstance(t, dist.ConditionalTransform) else t)
        return out

    def flow(self, x: torch.Tensor) -> tuple[Distribution, list[TransformModule]]:
        """The base distribution and the conditioned transforms for inputs ``x``."""
        h = self.encoder(x)
        return self.base(h), self.conditioned(h)

    def distribution(self, x: torch.Tensor) -> Distribution:
        base, transforms = self.flow(x)
        return dist.TransformedDistribution(base, transforms)

    def local_parameters(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's ``loc`` and unconstrained ``scale`` (N, k), then each transform's per-point parameters as
        ``flow{i}.{name}`` (see the family's ``local_parameters``: hypernetwork outputs for planar, radial and
        Householder; the context h for the autoregressive flows, whose per-point family is then the MADE
        conditioned on a free context, a subset of a fully free IAF, so its gap is an upper bound)."""
        h = self.encoder(x)
        out = self.head_parameters(h)
        for i, t in enumerate(self.transforms):
            if isinstance(t, dist.ConditionalTransform):
                out.update({f"flow{i}.{k}": v for k, v in self._local_parameters(t, h).items()})
        return out

    def distribution_from(self, params: dict[str, torch.Tensor]) -> Distribution:
        """The base N(loc, diag σ²) pushed through the transforms built from each ``flow{i}.*``; batch shape (N,)."""
        base = super().distribution_from(params)
        transforms: list[Transform] = []
        for i, t in enumerate(self.transforms):
            if self.reverse is not None and i > 0:
                transforms.append(self.reverse)
            if not isinstance(t, dist.ConditionalTransform):  # a transform without per-point parameters
                transforms.append(t)
                continue
            prefix = f"flow{i}."
            own = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
            if not own:
                raise ValueError(f"params: no {prefix}* entries for transform {i}; pass what local_parameters(x) "
                                 "returns")
            transforms.append(self._from_parameters(t, own))
        return dist.TransformedDistribution(base, transforms)


def _register(name: str, family: FlowFamily) -> None:
    def factory(model: LatentModel, config: GuideConfig, k: int | None) -> AmortizedFlowGuide:
        return AmortizedFlowGuide(model, config, family, k or family.default_k)

    factory.__name__ = name
    register_guide(name, arg_name="K (number of transforms)", default_arg=family.default_k,
                   summary=f"{family.summary}, conditioned on the encoder")(factory)


for _name in FLOWS:
    _register(_name, FLOWS[_name])


def flow_names() -> Sequence[str]:
    return FLOWS.names()
